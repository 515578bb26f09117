"""Settings: defaults < config.yaml < environment < explicit overrides.

Settings are loaded and validated once, at start, and passed down
explicitly. Nothing else in the package reads the environment.

A bad value raises :class:`ConfigError` whose message is one line naming the
key, the value and what is allowed, e.g.::

    buffer.flush_interval = 'soon' (from BUFFER_FLUSH_INTERVAL): must be a number

A setting marked secret (the database password, the bearer tokens) may also
come from the file that ``<NAME>_FILE`` names, as with the official database
images and Docker or Kubernetes secrets; its value never appears in a message
or in the ``repr`` of the settings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_PATH_ENV = "PERSISTENCE_CONFIG"
DEFAULT_CONFIG_PATH = "config.yaml"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
DRIVERS = ("sqlite", "mysql")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _setting(
    default: Any,
    env: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    normalize: Callable[[Any], Any] | None = None,
    secret: bool = False,
) -> Any:
    """Declare one setting: its default, its environment variable and its rule.

    ``normalize`` rewrites a converted value (e.g. upper-cases a log level);
    ``check`` returns None when the value is allowed, else the sentence that
    says what is allowed. A ``secret`` setting may be given as ``<env>_FILE``
    too, and its value is never shown (messages, ``repr``).
    """
    kwargs: dict[str, Any] = {
        "metadata": {"env": env, "check": check, "normalize": normalize, "secret": secret},
        "repr": not secret,
    }
    if isinstance(default, (list, tuple)):
        kwargs["default_factory"] = lambda: tuple(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _non_empty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _bearer_tokens(value: Any) -> str | None:
    for number, token in enumerate(value, start=1):
        if not _BEARER_TOKEN.fullmatch(token):
            # Never the token itself: the message goes to logs and terminals.
            return (
                f"token {number} of {len(value)} is not a bearer token: allowed are letters, "
                "digits and -._~+/ with = at the end only"
            )
    return None


def _instance_id(value: Any) -> str | None:
    if len(value) > 200 or not value.isprintable() or any(c.isspace() for c in value):
        return "must be at most 200 printable characters without spaces"
    return None


@dataclass(frozen=True)
class DatabaseServer:
    """One MySQL/MariaDB server of ``database.host``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_servers(text: str, default_port: int) -> tuple[DatabaseServer, ...]:
    """The servers of a ``database.host`` value: ``host``, ``host:port`` or ``[ipv6]:port``,
    separated by commas; an entry without a port gets ``default_port``.

    Raises ValueError saying what is wrong with the first bad entry.
    """
    if not text.strip():
        raise ValueError("must not be empty")
    servers: list[DatabaseServer] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            raise ValueError("must list host names separated by commas, without empty entries")
        host, port = _split_host_port(entry, default_port)
        server = DatabaseServer(host, port)
        if server in servers:
            raise ValueError(f"lists {server} twice")
        servers.append(server)
    return tuple(servers)


def _split_host_port(entry: str, default_port: int) -> tuple[str, int]:
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r} is not [IPv6 address] or [IPv6 address]:port")
        port_text = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise ValueError(f"{entry!r}: write an IPv6 address in brackets, e.g. [::1]:3306")
    else:
        host, colon, port_text_or_empty = entry.partition(":")
        port_text = port_text_or_empty if colon else None
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{entry!r} has no valid host name")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be an integer 1-65535")
    return host, int(port_text)


def _server_list(value: Any) -> str | None:
    try:
        # The real default port is only known with the whole section: entries that
        # name the same server only with it are caught by _check_cross_field.
        parse_servers(value, 0)
    except ValueError as exc:
        return str(exc)
    return None


def _status_set(value: Any) -> str | None:
    if not value:
        return "must list at least one status"
    too_long = [s for s in value if not 0 < len(s) <= 20]
    return f"each status must be 1 to 20 characters, not {too_long[0]!r}" if too_long else None


@dataclass(frozen=True)
class ServiceSettings:
    host: str = _setting("0.0.0.0", "SERVICE_HOST", _non_empty)
    port: int = _setting(8001, "SERVICE_PORT", _between(1, 65535))
    workers: int = _setting(1, "SERVICE_WORKERS", _between(1, 64))
    threads: int = _setting(8, "SERVICE_THREADS", _between(1, 256))
    reload: bool = _setting(False, "SERVICE_RELOAD")
    log_level: str = _setting("INFO", "SERVICE_LOG_LEVEL", _one_of(*LOG_LEVELS), str.upper)
    graceful_timeout: int = _setting(30, "SERVICE_GRACEFUL_TIMEOUT", _between(1, 3600))
    request_timeout: float = _setting(5.0, "SERVICE_REQUEST_TIMEOUT", _between(0.5, 600))
    max_request_bytes: int = _setting(
        10 * 1024 * 1024, "SERVICE_MAX_REQUEST_BYTES", _between(1024, 1024**3)
    )
    gil_switch_interval: float = _setting(
        0.001, "SERVICE_GIL_SWITCH_INTERVAL", _between(0.0001, 0.1)
    )
    # Used by bearer auth; one per line in SERVICE_AUTH_TOKENS_FILE.
    auth_tokens: tuple[str, ...] = _setting((), "SERVICE_AUTH_TOKENS", _bearer_tokens, secret=True)
    # HTTPS on the listener itself (gunicorn's certfile, keyfile and ca_certs).
    tls_cert: str = _setting("", "SERVICE_TLS_CERT")
    tls_key: str = _setting("", "SERVICE_TLS_KEY")
    tls_client_ca: str = _setting("", "SERVICE_TLS_CLIENT_CA")
    # Empty: "<host name>:<port>" (see effective_instance_id).
    instance_id: str = _setting("", "SERVICE_INSTANCE_ID", _instance_id)
    max_clock_skew: float = _setting(1.0, "SERVICE_MAX_CLOCK_SKEW", _between(0.001, 3600))

    @property
    def effective_instance_id(self) -> str:
        """The name this instance gives itself: ``instance_id``, else ``<host name>:<port>``."""
        return self.instance_id or f"{socket.gethostname()}:{self.port}"


@dataclass(frozen=True)
class BufferSettings:
    max_buffer_size: int = _setting(1000, "BUFFER_MAX_SIZE", _between(1, 10_000_000))
    flush_interval: float = _setting(30.0, "BUFFER_FLUSH_INTERVAL", _between(0.1, 86400))
    max_batch_size: int = _setting(1000, "BUFFER_MAX_BATCH_SIZE", _between(1, 1_000_000))
    hard_limit: int = _setting(100_000, "BUFFER_HARD_LIMIT", _between(1, 100_000_000))
    hard_limit_bytes: int = _setting(
        256 * 1024 * 1024, "BUFFER_HARD_LIMIT_BYTES", _between(1024 * 1024, 1024**4)
    )
    durability: str = _setting("memory", "BUFFER_DURABILITY", _one_of("memory", "journal"))
    journal_dir: str = _setting("data/journal", "BUFFER_JOURNAL_DIR", _non_empty)
    orphan_task_timeout: float = _setting(
        600.0, "BUFFER_ORPHAN_TASK_TIMEOUT", _between(0, 7 * 86400)
    )
    retry_backoff_initial: float = _setting(
        1.0, "BUFFER_RETRY_BACKOFF_INITIAL", _between(0.01, 3600)
    )
    retry_backoff_max: float = _setting(60.0, "BUFFER_RETRY_BACKOFF_MAX", _between(0.01, 86400))
    isolate_after_failures: int = _setting(3, "BUFFER_ISOLATE_AFTER_FAILURES", _between(1, 1000))


@dataclass(frozen=True)
class DatabaseSettings:
    driver: str = _setting("sqlite", "DB_DRIVER", _one_of(*DRIVERS))
    sqlite_path: str = _setting("data/persistence.db", "DB_SQLITE_PATH", _non_empty)
    # One server, or several separated by commas (failover in that order).
    host: str = _setting("localhost", "DB_HOST", _server_list)
    port: int = _setting(3306, "DB_PORT", _between(1, 65535))
    user: str = _setting("root", "DB_USER", _non_empty)
    password: str = _setting("", "DB_PASSWORD", secret=True)
    database: str = _setting("ai_terminal", "DB_DATABASE", _non_empty)
    pool_size: int = _setting(10, "DB_POOL_SIZE", _between(1, 1000))
    pool_recycle: int = _setting(3600, "DB_POOL_RECYCLE", _between(0, 7 * 86400))
    echo: bool = _setting(False, "DB_ECHO")
    create_tables: bool = _setting(True, "DB_CREATE_TABLES")
    connect_timeout: float = _setting(5.0, "DB_CONNECT_TIMEOUT", _between(0.1, 600))
    read_timeout: float = _setting(30.0, "DB_READ_TIMEOUT", _between(0.1, 3600))
    write_timeout: float = _setting(30.0, "DB_WRITE_TIMEOUT", _between(0.1, 3600))
    # 0: derived from the server's max_allowed_packet at start.
    max_record_bytes: int = _setting(0, "DB_MAX_RECORD_BYTES", _between(0, 1024**3))
    # TLS (persistence/store/tls.py): a CA turns it on and verifies the server's chain.
    ssl_ca: str = _setting("", "DB_SSL_CA")
    ssl_verify_identity: bool = _setting(True, "DB_SSL_VERIFY_IDENTITY")
    ssl_cert: str = _setting("", "DB_SSL_CERT")
    ssl_key: str = _setting("", "DB_SSL_KEY")
    max_rows_per_transaction: int = _setting(
        1000, "DB_MAX_ROWS_PER_TRANSACTION", _between(1, 10_000_000)
    )
    conflict_retries: int = _setting(3, "DB_CONFLICT_RETRIES", _between(0, 100))
    # Connections a flush writes over at once (MySQL/MariaDB; SQLite always writes over one).
    flush_connections: int = _setting(2, "DB_FLUSH_CONNECTIONS", _between(1, 16))

    @property
    def servers(self) -> tuple[DatabaseServer, ...]:
        """The servers of ``host``, in failover order (validated when the settings load)."""
        return parse_servers(self.host, self.port)


@dataclass(frozen=True)
class ValidationSettings:
    session_statuses: tuple[str, ...] = _setting(
        ("pending", "processing", "completed", "failed", "cancelled"), check=_status_set
    )
    task_statuses: tuple[str, ...] = _setting(
        ("pending", "processing", "completed", "failed"), check=_status_set
    )


@dataclass(frozen=True)
class HealthSettings:
    check_interval: float = _setting(5.0, "HEALTH_CHECK_INTERVAL", _between(0.5, 3600))
    probe_timeout: float = _setting(0.8, "HEALTH_PROBE_TIMEOUT", _between(0.1, 10))


@dataclass(frozen=True)
class LoggingSettings:
    level: str = _setting("INFO", "LOG_LEVEL", _one_of(*LOG_LEVELS), str.upper)
    format: str = _setting("text", "LOG_FORMAT", _one_of(*LOG_FORMATS), str.lower)
    file: str = _setting("logs/persistence_service.log", "LOG_FILE")
    max_bytes: int = _setting(10 * 1024 * 1024, "LOG_MAX_BYTES", _between(1024, 1024**4))
    backup_count: int = _setting(5, "LOG_BACKUP_COUNT", _between(0, 1000))


@dataclass(frozen=True)
class Settings:
    service: ServiceSettings = field(default_factory=ServiceSettings)
    buffer: BufferSettings = field(default_factory=BufferSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: str = "defaults"


_SECTION_CLASSES = {
    "service": ServiceSettings,
    "buffer": BufferSettings,
    "database": DatabaseSettings,
    "validation": ValidationSettings,
    "health": HealthSettings,
    "logging": LoggingSettings,
}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build validated settings from defaults, a YAML file, the environment and overrides.

    ``path`` defaults to ``$PERSISTENCE_CONFIG``, else ``config.yaml`` when it
    exists in the working directory. ``environ`` defaults to ``os.environ``;
    pass ``{}`` to ignore the environment. ``overrides`` (a nested mapping,
    e.g. ``{"database": {"driver": "sqlite"}}``) wins over everything.
    """
    environ = os.environ if environ is None else environ
    file_values, source = _read_file(path, environ)
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        sections[name] = _build_section(
            name, cls, file_values.get(name) or {}, environ, (overrides or {}).get(name) or {}
        )
    unknown = set(overrides or {}) - set(_SECTION_CLASSES)
    if unknown:
        raise ConfigError(
            f"unknown settings section {sorted(unknown)[0]!r}: "
            f"allowed sections are {', '.join(_SECTION_CLASSES)}"
        )
    settings = Settings(**sections, source=source)
    _check_cross_field(settings)
    return settings


def _read_file(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> tuple[dict[str, Any], str]:
    explicit = path is not None or CONFIG_PATH_ENV in environ
    chosen = Path(path if path is not None else environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))
    if not chosen.exists():
        if explicit:
            raise ConfigError(f"config file {str(chosen)!r}: does not exist")
        return {}, "defaults"
    try:
        data = yaml.safe_load(chosen.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"config file {str(chosen)!r}: cannot be read as YAML ({reason})"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(chosen)!r}: must hold a mapping of sections")
    for name, value in data.items():
        if name not in _SECTION_CLASSES:
            raise ConfigError(
                f"{_name(name)} (in {chosen}): unknown section; "
                f"allowed sections are {', '.join(_SECTION_CLASSES)}"
            )
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} (in {chosen}): must be a mapping of settings")
    return data, str(chosen)


def _build_section(
    section: str,
    cls: type,
    from_file: Mapping[str, Any],
    environ: Mapping[str, str],
    from_overrides: Mapping[str, Any],
) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in [*from_file, *from_overrides]:
        if key not in known:
            raise ConfigError(
                f"{section}.{_name(key)}: unknown setting; allowed are {', '.join(known)}"
            )
    values = {}
    for name, fld in known.items():
        env_name = fld.metadata["env"]
        secret_file = f"{env_name}_FILE" if env_name and fld.metadata["secret"] else None
        if secret_file and env_name in environ and secret_file in environ:
            raise ConfigError(
                f"{section}.{name}: {env_name} and {secret_file} are both set; set one of them"
            )
        if name in from_overrides:
            raw, origin = from_overrides[name], "override"
        elif env_name and env_name in environ:
            raw, origin = environ[env_name], env_name
        elif secret_file and secret_file in environ:
            raw, origin = _read_secret(secret_file, environ[secret_file], fld), secret_file
        elif name in from_file:
            raw, origin = from_file[name], "config file"
        else:
            continue
        values[name] = _coerce(f"{section}.{name}", raw, origin, fld)
    return cls(**values)


def _read_secret(variable: str, path: str, fld: dataclasses.Field[Any]) -> Any:
    """The value in the file ``variable`` names: its text less one trailing newline; for a
    list setting, its lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{variable} = {path!r}: the file cannot be read (not UTF-8 text)"
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{variable} = {path!r}: the file cannot be read ({reason})") from None
    if fld.type == "tuple[str, ...]":
        return text.splitlines()
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def _name(key: object) -> str:
    """A key as written, or quoted when it is not a plain name (keeps messages one line)."""
    return key if isinstance(key, str) and key.isidentifier() else repr(key)


def _coerce(key: str, raw: Any, origin: str, fld: dataclasses.Field[Any]) -> Any:
    kind = fld.type
    shown = "<secret>" if fld.metadata["secret"] else repr(raw)
    where = f"{key} = {shown} (from {origin})"
    try:
        value = _convert(kind, raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if fld.metadata["normalize"]:
        value = fld.metadata["normalize"](value)
    check = fld.metadata["check"]
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(kind: str, raw: Any) -> Any:
    """Convert a YAML or environment value to the annotated type (annotations are strings)."""
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError("must be true or false")
    if kind == "int":
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("must be an integer")
        try:
            return int(str(raw).strip()) if not isinstance(raw, float) else int(raw)
        except ValueError:
            raise ValueError("must be an integer") from None
    if kind == "float":
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ValueError("must be a number") from None
    if kind == "str":
        if raw is None:
            return ""
        if isinstance(raw, (dict, list)):
            raise ValueError("must be a string")
        return str(raw).strip() if not isinstance(raw, str) else raw
    if kind == "tuple[str, ...]":
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ValueError("must be a list of strings")
        return tuple(str(item).strip() for item in items if str(item).strip())
    raise TypeError(f"unsupported setting type {kind}")


def _check_cross_field(settings: Settings) -> None:
    buf = settings.buffer
    if buf.hard_limit < buf.max_buffer_size + buf.max_batch_size:
        raise ConfigError(
            f"buffer.hard_limit = {buf.hard_limit}: must be at least max_buffer_size + "
            f"max_batch_size ({buf.max_buffer_size + buf.max_batch_size}), "
            "or a full buffer would refuse batches before it flushes"
        )
    if buf.hard_limit_bytes < settings.service.max_request_bytes:
        raise ConfigError(
            f"buffer.hard_limit_bytes = {buf.hard_limit_bytes}: must be at least "
            f"service.max_request_bytes ({settings.service.max_request_bytes}), "
            "or the largest request allowed could never be accepted"
        )
    service = settings.service
    if service.graceful_timeout <= service.request_timeout:
        raise ConfigError(
            f"service.graceful_timeout = {service.graceful_timeout}: must be greater than "
            f"service.request_timeout ({service.request_timeout}), or a request still "
            "arriving at a stop would use up the time of the final flush"
        )
    try:
        settings.database.servers  # noqa: B018 - parsing is the check
    except ValueError as exc:
        raise ConfigError(
            f"database.host = {settings.database.host!r} (with database.port = "
            f"{settings.database.port}): {exc}"
        ) from None
    if buf.retry_backoff_max < buf.retry_backoff_initial:
        raise ConfigError(
            f"buffer.retry_backoff_max = {buf.retry_backoff_max}: "
            f"must be >= retry_backoff_initial ({buf.retry_backoff_initial})"
        )
    _check_tls_files(
        "service.tls_cert",
        service.tls_cert,
        "service.tls_key",
        service.tls_key,
        "service.tls_client_ca",
        service.tls_client_ca,
    )
    if service.tls_client_ca and not service.tls_cert:
        raise ConfigError(
            f"service.tls_client_ca = {service.tls_client_ca!r}: needs service.tls_cert "
            "(client certificates are asked for over HTTPS only)"
        )
    db = settings.database
    if db.driver == "mysql" and db.pool_size < db.flush_connections:
        raise ConfigError(
            f"database.pool_size = {db.pool_size}: must be at least database.flush_connections "
            f"({db.flush_connections}), or the flush's connections would wait for each other; "
            "set flush_connections to 1 to flush over one connection"
        )
    if db.driver == "mysql":
        _check_tls_files(
            "database.ssl_cert", db.ssl_cert, "database.ssl_key", db.ssl_key,
            "database.ssl_ca", db.ssl_ca,
        )  # fmt: skip
        if db.ssl_cert and not db.ssl_ca:
            raise ConfigError(
                f"database.ssl_cert = {db.ssl_cert!r}: needs database.ssl_ca, or the client "
                "certificate would go to a server whose certificate nobody checked"
            )


class _EncryptedKey(Exception):
    """Raised by the password callback: a private key file that asks for a password."""


def _refuse_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal, and a service would hang.
    raise _EncryptedKey


def _check_tls_files(
    cert_key: str, cert: str, key_key: str, key: str, ca_key: str, ca: str
) -> None:
    """One-line errors for TLS files that are missing, unreadable or not what they should be:
    ``ca`` a PEM CA bundle; ``cert`` a PEM certificate whose private key is ``key`` (or is
    in the same file when ``key`` is empty)."""
    if key and not cert:
        raise ConfigError(f"{key_key} = {key!r}: needs {cert_key} (the certificate of the key)")
    for name, path in ((ca_key, ca), (cert_key, cert), (key_key, key)):
        if path:
            problem = _file_problem(path)
            if problem:
                raise ConfigError(f"{name} = {path!r}: {problem}")
    if ca:
        try:
            ssl.create_default_context(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{ca_key} = {ca!r}: holds no PEM certificate ({_ssl_reason(exc)})"
            ) from None
    if cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_cert_chain(cert, key or None, password=_refuse_password)
        except _EncryptedKey:
            raise ConfigError(
                f"{key_key if key else cert_key} = {key or cert!r}: the private key is "
                "encrypted; give it unencrypted, in a file only the service can read"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{cert_key} = {cert!r}: must be a PEM certificate, and {key_key} its PEM "
                f"private key (or the key in the same file) ({_ssl_reason(exc)})"
            ) from None


def _file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable file, or None."""
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return " ".join(str(exc.reason or exc).split()) or type(exc).__name__


def describe(settings: Settings) -> str:
    """One log line naming the database in use and its TLS settings, without secrets."""
    db = settings.database
    if db.driver == "sqlite":
        return f"sqlite file {db.sqlite_path}"
    servers = ",".join(str(server) for server in db.servers)
    target = f"mysql {db.user}@{servers}/{db.database}"
    if not db.ssl_ca:
        return f"{target}, TLS not required (unverified if the server offers it, else plain text)"
    tls = f"TLS required, server certificate must verify against {db.ssl_ca}"
    tls += " and name the host" if db.ssl_verify_identity else ", host name NOT checked"
    if db.ssl_cert:
        tls += f", client certificate {db.ssl_cert}"
    return f"{target}, {tls}"
