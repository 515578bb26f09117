# Persistence Service image: gunicorn serving wsgi:app on port 8001.
#   docker build -t persistence-service:1.0.0 .
#   podman build --format docker -t persistence-service:1.0.0 .   (OCI format drops HEALTHCHECK)
#   docker run -d -p 8001:8001 --read-only -v persistence-data:/app/data \
#       --stop-timeout 45 persistence-service:1.0.0
# Configuration: config.yaml in the image, overridden by environment variables
# (README.md, "Configuration"). See docs/DEPLOYMENT.md, "Docker".

# Build stage: the pinned requirements, installed into a virtualenv.
FROM python:3.11.13-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements.txt

# Runtime stage: the virtualenv and the code that runs, nothing else.
FROM python:3.11.13-slim-bookworm
# LOG_FILE empty: the service logs to stderr only, which the engine collects.
# TMPDIR: gunicorn's worker heartbeat files and the workers' control sockets go to
# /dev/shm, a tmpfs that stays writable under --read-only (and a heartbeat on the
# container's overlay file system can stall workers).
# Bytecode is compiled below, at build time; nothing is written next to the code.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}" \
    LOG_FILE="" \
    TMPDIR=/dev/shm
RUN groupadd --system --gid 10001 persistence \
    && useradd --system --uid 10001 --gid persistence --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin persistence
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY persistence/ ./persistence/
COPY schedules/ ./schedules/
COPY wsgi.py gunicorn.conf.py config.yaml ./
RUN python -m compileall -q persistence schedules wsgi.py
# The only places the service writes: data/ (the SQLite file and the journal; mount a
# volume there) and, if LOG_FILE names a file in it, logs/. The code stays root's.
RUN mkdir -p data logs && chown persistence:persistence data logs
USER persistence
EXPOSE 8001
# gunicorn's master stops gracefully on SIGTERM: the worker writes everything
# buffered first. Give it more than service.graceful_timeout (30 s):
# docker stop -t 45, or stop_grace_period in docker-compose.yml.
STOPSIGNAL SIGTERM
# The check reads the same settings as the service (config file and environment),
# requests /health and prints one line: exit 0 on 200, 1 on anything else.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -m persistence.healthcheck  # urllib GET /health on service.host:service.port
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
