"""What can be checked of the packaging without a Docker engine or systemd.

Dockerfile, .dockerignore, docker-compose.yml, the systemd unit, the nginx
sample and README.md's configuration table, each checked against the code it
describes (persistence/config.py, config.yaml). The Dockerfile's HEALTHCHECK
command is run for real against a small HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import http.server
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from persistence.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_FILES = {"persistence", "schedules", "wsgi.py", "gunicorn.conf.py", "config.yaml"}


# --- helpers -------------------------------------------------------------------------------


def sections() -> dict[str, Any]:
    """The default settings of each section of persistence/config.py, by section name."""
    defaults = Settings()
    return {
        f.name: getattr(defaults, f.name)
        for f in dataclasses.fields(Settings)
        if dataclasses.is_dataclass(getattr(defaults, f.name))
    }


def settings_table() -> dict[str, tuple[str | None, Any]]:
    """``section.key`` -> (environment variable or None, default) for every setting."""
    table = {}
    for name, section in sections().items():
        for fld in dataclasses.fields(section):
            table[f"{name}.{fld.name}"] = (fld.metadata["env"], getattr(section, fld.name))
    return table


def env_names() -> set[str]:
    return {env for env, _ in settings_table().values() if env}


def shipped_settings(environ: dict[str, str] | None = None) -> Settings:
    """The settings config.yaml gives, with ``environ`` on top (not the test's environment)."""
    return load_settings(path=ROOT / "config.yaml", environ=environ or {})


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends with a line continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list, or a test failure."""
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {arguments}")
    assert isinstance(argv, list), arguments
    assert all(isinstance(arg, str) for arg in argv), arguments
    return argv


def healthcheck_argv() -> list[str]:
    checks = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    options, marker, command = checks[0].partition("CMD ")
    assert marker, f"HEALTHCHECK without CMD: {checks[0]}"
    assert "NONE" not in options.upper()
    return exec_form(command)


def copy_sources() -> list[str]:
    """Sources of every COPY that takes files from the build context."""
    sources = []
    for word, rest in dockerfile():
        if word not in ("COPY", "ADD"):
            continue
        args = shlex.split(rest)
        if any(arg.startswith("--from") for arg in args):
            continue
        args = [arg for arg in args if not arg.startswith("--")]
        assert len(args) >= 2, f"{word} {rest}"
        sources.extend(args[:-1])
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignore = ROOT / ".dockerignore"
    if not ignore.exists():
        return False
    excluded = False
    for line in ignore.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            parts = path.split("/")
            matched = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            matched = fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")
        if matched:
            excluded = not negate
    return excluded


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert isinstance(data.get("services"), dict)
    return data


def compose_service() -> dict[str, Any]:
    """The compose service built from this repository's Dockerfile."""
    built = [svc for svc in compose()["services"].values() if "build" in svc]
    assert len(built) == 1, "docker-compose.yml should build exactly one service"
    return built[0]


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    # ${VAR:-default} -> default; other interpolations -> a placeholder value.
    values = {}
    for key, value in env.items():
        text = "" if value is None else str(value)
        text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)
        values[key] = re.sub(r"\$\{[^}]*\}", "placeholder", text)
    return values


def seconds(duration: str | int | float, units: dict[str, float]) -> float:
    """A duration like ``45s``, ``1m30s`` or ``90`` in seconds."""
    text = str(duration).strip().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    assert parts, f"cannot read duration {duration!r}"
    assert "".join(n + u for n, u in parts) == text, f"cannot read duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


COMPOSE_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
SYSTEMD_UNITS = {"h": 3600, "hr": 3600, "min": 60, "m": 60, "s": 1, "sec": 1, "ms": 0.001}


def systemd_unit() -> dict[str, list[str]]:
    """``Section.Key`` -> values of deploy/persistence-service.service."""
    values: dict[str, list[str]] = {}
    section = ""
    text = (ROOT / "deploy" / "persistence-service.service").read_text(encoding="utf-8")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def unit_value(unit: dict[str, list[str]], key: str) -> str:
    assert key in unit, f"the unit lacks {key}"
    return unit[key][-1]


def render_default(value: Any) -> str:
    """A default as README.md's table writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = ", ".join(value)  # an empty list is written as an empty text
    if value == "":
        return '""'
    return str(value)


def readme_table() -> dict[str, tuple[str | None, str]]:
    """README.md's configuration table: ``section.key`` -> (environment variable, default)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    header = [i for i, line in enumerate(lines) if re.match(r"\|\s*Key\s*\|\s*Environment", line)]
    assert len(header) == 1, "README.md needs one table starting | Key | Environment |"
    columns = [cell.strip() for cell in lines[header[0]].strip().strip("|").split("|")]
    rows: dict[str, tuple[str | None, str]] = {}
    for line in lines[header[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(
            zip(columns, (c.strip() for c in line.strip().strip("|").split("|")), strict=True)
        )
        key = cells["Key"].strip("`")
        env = cells["Environment"].strip("`")
        assert key not in rows, f"README.md lists {key} twice"
        rows[key] = (None if env in ("—", "-", "") else env, cells["Default"].strip("`"))
    return rows


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_cmd_is_exec_form_gunicorn_with_its_config() -> None:
    cmds = [rest for word, rest in final_stage() if word == "CMD"]
    assert cmds, "the final stage has no CMD"
    argv = exec_form(cmds[-1])
    assert Path(argv[0]).name == "gunicorn"
    assert "-c" in argv
    assert argv[argv.index("-c") + 1] == "gunicorn.conf.py"
    assert argv[-1] == "wsgi:app"
    assert not [word for word, _ in final_stage() if word == "ENTRYPOINT"]


def test_dockerfile_base_images_are_pinned() -> None:
    stages: set[str] = set()
    froms = [rest for word, rest in dockerfile() if word == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    for rest in froms:
        words = [w for w in rest.split() if not w.startswith("--")]
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image in stages:
            continue
        name, _, tag = image.partition(":")
        assert tag, f"{image} has no tag"
        assert "latest" not in tag, f"{image} is not pinned"
        assert "$" not in tag, f"{image} is not pinned"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: the tag lacks a patch version"
        assert name.split("/")[-1] == "python", image


def test_dockerfile_runs_as_a_user_it_creates() -> None:
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the final USER is root"
    runs = " ".join(rest for word, rest in stage if word == "RUN")
    assert re.search(rf"(useradd|adduser)\b[^&;]*\b{re.escape(user)}\b", runs), (
        f"no RUN creates the user {user}"
    )
    words = [word for word, _ in stage]
    assert words.index("USER") < words.index("CMD")
    # The directories the service writes belong to that user.
    assert re.search(rf"chown\s+{re.escape(user)}\S*\s+.*\bdata\b.*\blogs\b", runs)


def test_dockerfile_runtime_settings() -> None:
    stage = final_stage()
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert [rest for word, rest in stage if word == "WORKDIR"][-1] == "/app"
    exposed = {rest.split("/")[0] for word, rest in stage if word == "EXPOSE"}
    assert exposed == {str(shipped_settings().service.port)}


def test_dockerfile_copies_existing_runtime_files_only() -> None:
    sources = copy_sources()
    assert sources
    copied = set()
    for source in sources:
        path = source.rstrip("/")
        assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(path), f"COPY {source}: excluded by .dockerignore"
        copied.add(path)
    assert copied - {"requirements.txt"} == RUNTIME_FILES
    assert "requirements.txt" in copied


def test_dockerfile_installs_requirements_in_a_venv_in_a_builder_stage() -> None:
    instructions = dockerfile()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    builder = instructions[starts[0] : starts[-1]]
    runs = " ".join(rest for word, rest in builder if word == "RUN")
    assert "-m venv" in runs
    assert re.search(r"pip install[^&;]*-r \S*requirements\.txt", runs)
    copies_from_builder = [
        rest for word, rest in final_stage() if word == "COPY" and "--from" in rest
    ]
    assert copies_from_builder, "the final stage copies nothing from the builder"


def test_dockerignore_keeps_development_files_out() -> None:
    for path in (".venv", ".git", "tests", "data", "logs", "persistence/__pycache__"):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"


# --- the HEALTHCHECK command, run for real -------------------------------------------------


class _StatusServer(http.server.ThreadingHTTPServer):
    """Answers GET with the next status of ``statuses`` and records the paths asked."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _StatusHandler)


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    server: _StatusServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        status = self.server.statuses.pop(0)
        body = json.dumps({"status": "healthy" if status == 200 else "unhealthy"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[_StatusServer]:
    server = _StatusServer([200, 503])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    argv = healthcheck_argv()
    assert argv[0] in ("python", "python3"), "the slim image has no curl; use python"
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env={"SERVICE_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_command_passes_on_200_and_fails_on_503(health_server: _StatusServer) -> None:
    port = health_server.server_address[1]
    healthy = run_healthcheck(port)
    assert healthy.returncode == 0, healthy.stderr
    unhealthy = run_healthcheck(port)
    assert unhealthy.returncode == 1, unhealthy.stderr
    assert health_server.paths == ["/health", "/health"]


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(port).returncode == 1


def test_healthcheck_defaults_to_the_service_port() -> None:
    snippet = " ".join(healthcheck_argv())
    assert "127.0.0.1" in snippet
    assert "/health" in snippet
    assert f"'{shipped_settings().service.port}'" in snippet


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_service_environment_names_are_settings() -> None:
    env = compose_environment(compose_service())
    assert env.get("DB_DRIVER") == "mysql"
    unknown = set(env) - env_names()
    assert not unknown, f"not environment variables of persistence/config.py: {sorted(unknown)}"
    # The values pass the service's own validation.
    settings = shipped_settings(env)
    assert settings.database.driver == "mysql"


def test_compose_service_waits_for_a_healthy_mysql_and_uses_it() -> None:
    services = compose()["services"]
    service = compose_service()
    depends = service.get("depends_on")
    assert isinstance(depends, dict), "depends_on needs the long form with a condition"
    [(name, condition)] = depends.items()
    assert condition == {"condition": "service_healthy"}
    mysql = services[name]
    assert "healthcheck" in mysql
    assert mysql["healthcheck"].get("test")
    assert compose_environment(service)["DB_HOST"] == name
    assert any(str(p).endswith(":8001") for p in service.get("ports", []))
    volumes = compose().get("volumes") or {}
    assert any(str(v).split(":")[0] in volumes for v in mysql.get("volumes", [])), (
        "mysql should keep its data on a named volume"
    )


def test_compose_journal_lives_on_a_volume() -> None:
    service = compose_service()
    settings = shipped_settings(compose_environment(service))
    if settings.buffer.durability != "journal":
        pytest.skip("the compose service keeps its buffer in memory")
    journal = Path("/app", settings.buffer.journal_dir)
    targets = [Path(str(v).split(":")[1]) for v in service.get("volumes", []) if ":" in str(v)]
    assert any(journal == t or t in journal.parents for t in targets), (
        f"{journal} is not on a volume: the journal would go away with the container"
    )


def test_compose_mysql_image_is_pinned_to_a_patch_release() -> None:
    images = [svc["image"] for svc in compose()["services"].values() if "build" not in svc]
    mysql = [image for image in images if image.split(":")[0] == "mysql"]
    assert len(mysql) == 1
    assert re.fullmatch(r"mysql:8\.0\.\d+", mysql[0]), mysql[0]


def test_compose_stop_grace_period_exceeds_graceful_timeout() -> None:
    service = compose_service()
    assert "stop_grace_period" in service
    grace = seconds(service["stop_grace_period"], COMPOSE_UNITS)
    graceful = shipped_settings(compose_environment(service)).service.graceful_timeout
    assert grace > graceful


# --- systemd unit and nginx ----------------------------------------------------------------


def test_systemd_unit_runs_gunicorn_from_its_venv() -> None:
    unit = systemd_unit()
    workdir = unit_value(unit, "Service.WorkingDirectory")
    assert workdir == "/opt/persistence-service"
    argv = shlex.split(unit_value(unit, "Service.ExecStart"))
    assert argv == [f"{workdir}/.venv/bin/gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert unit_value(unit, "Service.EnvironmentFile") == "-/etc/persistence-service/env"
    assert unit_value(unit, "Service.User") not in ("root", "0")
    assert unit_value(unit, "Service.Restart") == "on-failure"


def test_systemd_unit_waits_longer_than_graceful_timeout() -> None:
    unit = systemd_unit()
    assert unit_value(unit, "Service.KillSignal") == "SIGTERM"
    stop = seconds(unit_value(unit, "Service.TimeoutStopSec"), SYSTEMD_UNITS)
    assert stop > shipped_settings().service.graceful_timeout


def test_systemd_hardening_leaves_logs_and_data_writable() -> None:
    unit = systemd_unit()
    workdir = unit_value(unit, "Service.WorkingDirectory")
    if unit.get("Service.ProtectSystem", [""])[-1] in ("strict", "full", "yes", "true"):
        writable = " ".join(unit.get("Service.ReadWritePaths", [])).split()
        writable = [path.lstrip("-") for path in writable]
        settings = shipped_settings()
        for relative in (settings.logging.file, settings.database.sqlite_path):
            directory = str(Path(workdir, relative).parent)
            assert directory in writable, f"{directory} is read-only under ProtectSystem"


def test_nginx_body_limit_matches_max_request_bytes() -> None:
    text = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    sizes = re.findall(r"^\s*client_max_body_size\s+(\d+)([kKmM]?)\s*;", text, re.MULTILINE)
    assert len(sizes) == 1
    number, unit = sizes[0]
    limit = int(number) * {"": 1, "k": 1024, "m": 1024**2}[unit.lower()]
    assert limit == shipped_settings().service.max_request_bytes
    assert re.search(r"proxy_pass\s+http://", text)
    assert "127.0.0.1:8001" in text


# --- README.md's configuration table -------------------------------------------------------


def test_readme_table_lists_every_setting_and_no_other() -> None:
    documented = readme_table()
    actual = settings_table()
    assert sorted(set(documented) - set(actual)) == [], "README.md lists unknown settings"
    assert sorted(set(actual) - set(documented)) == [], "README.md misses settings"


def test_readme_table_environment_variables_match() -> None:
    documented = readme_table()
    for key, (env, _) in settings_table().items():
        assert documented[key][0] == env, f"{key}: README.md says {documented[key][0]}"
    named = {env for env, _ in documented.values() if env}
    assert named <= env_names()


def test_readme_table_defaults_match() -> None:
    documented = readme_table()
    for key, (_, default) in settings_table().items():
        assert documented[key][1] == render_default(default), key
