"""What can be checked of the packaging without a Docker engine or systemd.

Dockerfile, .dockerignore, docker-compose.yml and docker-compose.proxy.yml,
the Makefile's container target, the systemd unit, the nginx sample and
README.md's configuration table, each checked against the code it describes
(persistence/config.py, persistence/datadir.py, config.yaml). The
Dockerfile's HEALTHCHECK command is run for real against a small HTTP server
on 127.0.0.1. The image itself is built and run by ``make container-check``.
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
from persistence.datadir import data_directories
from persistence.healthcheck import DEFAULT_TIMEOUT

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


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (``{"timeout": "5s", ...}``) and its command as argv."""
    checks = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    options, marker, command = checks[0].partition("CMD ")
    assert marker, f"HEALTHCHECK without CMD: {checks[0]}"
    assert "NONE" not in options.upper()
    command = command.strip()
    # The shell form runs as /bin/sh -c "<command>", as the engine runs it.
    argv = exec_form(command) if command.startswith("[") else ["/bin/sh", "-c", command]
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), argv


def image_environment() -> dict[str, str]:
    """The variables the final stage's ENV instructions set, as the image has them."""
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                name, equals, value = item.partition("=")
                assert equals, f"ENV {rest}: use NAME=value"
                env[name] = value
    return env


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


class ComposeTag:
    """A value marked with a Compose merge tag (``!reset``, ``!override``)."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Docker Compose reads it: the merge tags are kept, not refused."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> ComposeTag:
    if isinstance(node, yaml.SequenceNode):
        value: Any = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return ComposeTag(node.tag, value)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    data = yaml.load((ROOT / name).read_text(encoding="utf-8"), Loader=_ComposeLoader)
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
    env = image_environment()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert [rest for word, rest in stage if word == "WORKDIR"][-1] == "/app"
    exposed = {rest.split("/")[0] for word, rest in stage if word == "EXPOSE"}
    assert exposed == {str(shipped_settings().service.port)}
    assert [rest for word, rest in stage if word == "STOPSIGNAL"] == ["SIGTERM"]


def test_image_logs_to_stderr_only() -> None:
    # The image's environment, read by the service's own settings: no log file in the
    # container's writable layer (nor a crash under --read-only).
    env = {k: v for k, v in image_environment().items() if k in env_names()}
    assert shipped_settings().logging.file, "config.yaml is expected to name a log file"
    assert shipped_settings(env).logging.file == ""


def test_image_writes_nothing_outside_volumes_and_tmpfs() -> None:
    env = image_environment()
    # gunicorn's heartbeat files and the control sockets go to the temporary directory.
    assert env.get("TMPDIR") == "/dev/shm"
    # No bytecode next to the code at run time: it is compiled into the image.
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    runs = " ".join(rest for word, rest in final_stage() if word == "RUN")
    compiled = re.search(r"-m compileall\b([^&;]*)", runs)
    assert compiled, "the final stage does not compile the code's bytecode"
    targets = set(shlex.split(compiled.group(1)))
    imported = {path for path in RUNTIME_FILES if path.endswith(".py") or "." not in path}
    assert imported - {"gunicorn.conf.py"} <= targets


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
    development = (".venv", ".git", "tests", "data", "logs", "persistence/__pycache__")
    for path in (*development, "docker-compose.yml", "docker-compose.proxy.yml", ".env"):
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


def run_healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command, run in the repository as in /app."""
    _, argv = healthcheck()
    if argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    # The image has python on its PATH and no curl; here `python` is this interpreter.
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(
        argv,
        cwd=ROOT,
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_command_passes_on_200_and_fails_on_503(health_server: _StatusServer) -> None:
    port = str(health_server.server_address[1])
    healthy = run_healthcheck(SERVICE_PORT=port)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    unhealthy = run_healthcheck(SERVICE_PORT=port)
    assert unhealthy.returncode == 1, unhealthy.stdout + unhealthy.stderr
    assert "Traceback" not in unhealthy.stdout + unhealthy.stderr
    assert health_server.paths == ["/health", "/health"]


def test_healthcheck_command_probes_the_port_of_a_config_file(
    health_server: _StatusServer, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"service:\n  port: {health_server.server_address[1]}\n")
    healthy = run_healthcheck(PERSISTENCE_CONFIG=str(config))
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert health_server.paths == ["/health"]


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_healthcheck(SERVICE_PORT=str(port)).returncode == 1


def test_healthcheck_gives_up_before_the_engine_kills_it() -> None:
    options, argv = healthcheck()
    assert "persistence.healthcheck" in " ".join(argv)
    # The probe's own timeout, plus starting Python, must fit in the engine's.
    engine_timeout = seconds(options.get("timeout", "30s"), COMPOSE_UNITS)
    assert engine_timeout >= DEFAULT_TIMEOUT + 1
    assert seconds(options.get("interval", "30s"), COMPOSE_UNITS) > engine_timeout


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


def volume_targets(service: dict[str, Any]) -> list[Path]:
    return [Path(str(v).split(":")[1]) for v in service.get("volumes", []) if ":" in str(v)]


def test_compose_service_is_read_only_but_where_its_volumes_are() -> None:
    service = compose_service()
    # The name the docs, the proxy overlay and the logs (<project>_persistence_1) use.
    assert "build" in compose()["services"]["persistence"]
    assert service.get("read_only") is True
    image_env = {k: v for k, v in image_environment().items() if k in env_names()}
    settings = shipped_settings({**image_env, **compose_environment(service)})
    assert settings.logging.file == ""
    written = data_directories(settings)
    assert written, "the compose service is expected to keep a journal"
    targets = volume_targets(service)
    for setting, directory in written:
        path = Path("/app", directory)
        assert any(path == t or t in path.parents for t in targets), (
            f"{path} ({setting}) is not on a volume: it is read-only, and would go away "
            "with the container"
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


# --- docker-compose.proxy.yml: nginx in front ----------------------------------------------


def nginx_directives(name: str) -> list[str]:
    text = (ROOT / "deploy" / "nginx.conf").read_text(encoding="utf-8")
    return re.findall(rf"^\s*{name}\s+([^;{{]+);", text, re.MULTILINE)


def test_proxy_overlay_publishes_nginx_with_the_sample_config() -> None:
    services = compose("docker-compose.proxy.yml")["services"]
    proxy = services["proxy"]
    assert "build" not in proxy
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+", proxy["image"]), proxy["image"]
    mounts = [str(v).split(":") for v in proxy.get("volumes", [])]
    [(source, target, mode)] = [m for m in mounts if m[0].endswith("nginx.conf")]
    # Paths of a second compose file are relative to the first one's directory.
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/conf.d/default.conf"
    assert mode == "ro"
    [listen] = nginx_directives("listen")
    assert proxy.get("ports") == [f"8001:{listen.split()[0]}"]


def test_proxy_overlay_leaves_gunicorn_to_nginx_alone() -> None:
    service = compose("docker-compose.proxy.yml")["services"]["persistence"]
    assert service.get("network_mode") == "service:proxy"
    ports = service.get("ports")
    assert isinstance(ports, ComposeTag), "gunicorn's own port stays published"
    assert ports.tag == "!reset"
    depends = service.get("depends_on") or {}
    assert depends.get("proxy", {}).get("restart") is True
    # The sample's upstream is where the service listens with both files' environment.
    base = compose_service()
    env = {**compose_environment(base), **compose_environment(service)}
    settings = shipped_settings(env).service
    [upstream] = nginx_directives("server")
    assert upstream.split()[0] == f"{settings.host}:{settings.port}"
    assert settings.host == "127.0.0.1", "gunicorn would be reachable around nginx"


# --- Makefile ------------------------------------------------------------------------------


def make_rules() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The Makefile's ``NAME ?= value`` variables and each target's recipe lines."""
    variables: dict[str, str] = {}
    recipes: dict[str, list[str]] = {}
    target = None
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("\t") and target:
            recipes[target].append(line.strip())
            continue
        target = None
        if match := re.match(r"([A-Z_]+)\s*\?=\s*(.*)$", line):
            variables[match.group(1)] = match.group(2).strip()
        elif match := re.match(r"([a-z][\w.-]*)\s*:(?!=)", line):
            target = match.group(1)
            recipes[target] = [line]
    return variables, recipes


def test_make_container_check_runs_the_shared_script_on_this_checkout() -> None:
    variables, recipes = make_rules()
    assert variables["CONTAINER_CHECK"] == "../shared/tools/container-check.sh"
    recipe = " ".join(recipes["container-check"][1:])
    assert "SRC=$(CURDIR)" in recipe
    assert "$(CONTAINER_CHECK)" in recipe
    # Not part of the test suite: it needs root, podman and minutes.
    assert "container" not in " ".join(recipes["test"])


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
