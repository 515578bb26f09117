# Persistence Service image: gunicorn serving wsgi:app on port 8001.
#   docker build -t persistence-service:1.0.0 .
#   docker run -d -p 8001:8001 -v persistence-data:/app/data --stop-timeout 45 persistence-service:1.0.0
# Configuration: config.yaml in the image, overridden by environment variables
# (README.md, "Configuration"). See docs/DEPLOYMENT.md.

# Build stage: the pinned requirements, installed into a virtualenv.
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements.txt

# Runtime stage: the virtualenv and the code that runs, nothing else.
FROM python:3.11.13-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"
RUN groupadd --system --gid 10001 persistence \
    && useradd --system --uid 10001 --gid persistence --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin persistence
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY persistence/ ./persistence/
COPY schedules/ ./schedules/
COPY wsgi.py gunicorn.conf.py config.yaml ./
# The only places the service writes: data/ (SQLite file, journal) and logs/.
RUN mkdir -p data logs && chown persistence:persistence data logs
USER persistence
EXPOSE 8001
# gunicorn's master stops gracefully on SIGTERM: the worker writes everything
# buffered first. Give it more than service.graceful_timeout (30 s):
# docker stop -t 45, or stop_grace_period in docker-compose.yml.
STOPSIGNAL SIGTERM
# The slim image has no curl. Exit 0 on 200; any error, including 503 (database
# unreachable), raises and exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('SERVICE_PORT', '8001'); sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
