"""Unit tests of persistence/config.py: defaults, precedence, validation messages, describe().

Every test passes ``environ`` explicitly and runs in an empty working directory,
so neither the real environment nor the repository's config.yaml leaks in.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from persistence.config import ConfigError, Settings, describe, load_settings
from tests.certs import CertSet, make_ca, make_leaf, make_test_certs, openssl_or_skip

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config.yaml in the working directory unless a test writes one."""
    monkeypatch.chdir(tmp_path)


def write_yaml(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def value_at(settings: Settings, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(settings, section), key)


def config_error(**kwargs: Any) -> str:
    """The message of the ConfigError that ``load_settings(**kwargs)`` raises; it is one line."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as exc:
        load_settings(**kwargs)
    message = str(exc.value)
    assert "\n" not in message
    assert "\r" not in message
    assert message.strip() == message
    assert message
    return message


# --- defaults --------------------------------------------------------------------------------

SPEC_DEFAULTS = {
    "service.host": "0.0.0.0",
    "service.port": 8001,
    "service.workers": 1,
    "buffer.max_buffer_size": 1000,
    "buffer.flush_interval": 30,
    "buffer.max_batch_size": 1000,
    "database.host": "localhost",
    "database.port": 3306,
    "database.user": "root",
    "database.password": "",
    "database.database": "ai_terminal",
    "database.pool_size": 10,
    "database.pool_recycle": 3600,
    "database.echo": False,
    "database.driver": "sqlite",
    "logging.file": "logs/persistence_service.log",
    "logging.max_bytes": 10 * 1024 * 1024,
    "logging.backup_count": 5,
    "validation.session_statuses": ("pending", "processing", "completed", "failed", "cancelled"),
    "validation.task_statuses": ("pending", "processing", "completed", "failed"),
}


@pytest.mark.parametrize(("dotted", "expected"), SPEC_DEFAULTS.items())
def test_defaults_follow_the_spec(dotted: str, expected: Any) -> None:
    value = value_at(load_settings(environ={}), dotted)
    assert value == expected
    if isinstance(expected, bool):
        assert value is expected


def test_defaults_without_any_file_are_the_dataclass_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.source == "defaults"


def test_hard_limit_default_leaves_room_for_a_full_buffer_and_a_batch() -> None:
    buf = load_settings(environ={}).buffer
    assert buf.hard_limit >= buf.max_buffer_size + buf.max_batch_size


# --- which file -----------------------------------------------------------------------------


def test_config_yaml_in_working_directory_is_read_by_default(tmp_path: Path) -> None:
    write_yaml(tmp_path, "service:\n  port: 9001\n", name="config.yaml")
    settings = load_settings(environ={})
    assert settings.service.port == 9001
    assert settings.source == "config.yaml"


def test_missing_default_config_yaml_is_not_an_error(tmp_path: Path) -> None:
    assert not (tmp_path / "config.yaml").exists()
    assert load_settings(environ={}).source == "defaults"


def test_persistence_config_in_environ_selects_the_file(tmp_path: Path) -> None:
    write_yaml(tmp_path, "service:\n  port: 9001\n", name="config.yaml")
    chosen = write_yaml(tmp_path, "service:\n  port: 9002\n", name="other.yaml")
    settings = load_settings(environ={"PERSISTENCE_CONFIG": str(chosen)})
    assert settings.service.port == 9002
    assert settings.source == str(chosen)


def test_path_argument_wins_over_persistence_config(tmp_path: Path) -> None:
    by_env = write_yaml(tmp_path, "service:\n  port: 9002\n", name="env.yaml")
    by_arg = write_yaml(tmp_path, "service:\n  port: 9003\n", name="arg.yaml")
    settings = load_settings(path=by_arg, environ={"PERSISTENCE_CONFIG": str(by_env)})
    assert settings.service.port == 9003


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    message = config_error(path=missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_missing_file_named_by_persistence_config_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    message = config_error(environ={"PERSISTENCE_CONFIG": str(missing)})
    assert str(missing) in message
    assert "does not exist" in message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "service:\n"])
def test_empty_file_or_empty_section_gives_defaults(tmp_path: Path, text: str) -> None:
    settings = load_settings(path=write_yaml(tmp_path, text), environ={})
    assert dataclasses.replace(settings, source="defaults") == Settings()


# --- precedence -----------------------------------------------------------------------------

# (environment variable, dotted key, file value, environment value, expected from environment,
#  override value); each differs from the default and from the others.
ENV_CASES = [
    ("DB_DRIVER", "database.driver", "sqlite", "mysql", "mysql", "sqlite"),
    ("DB_HOST", "database.host", "db.file", "db.env", "db.env", "db.override"),
    ("DB_PORT", "database.port", 3307, "3308", 3308, 3309),
    ("DB_USER", "database.user", "file_user", "env_user", "env_user", "override_user"),
    ("DB_PASSWORD", "database.password", "file-pw", "env-pw", "env-pw", "override-pw"),
    ("DB_DATABASE", "database.database", "file_db", "env_db", "env_db", "override_db"),
    ("SERVICE_HOST", "service.host", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4"),
    ("SERVICE_PORT", "service.port", 9001, "9002", 9002, 9003),
    ("SERVICE_WORKERS", "service.workers", 2, "3", 3, 4),
    ("SERVICE_THREADS", "service.threads", 2, "3", 3, 4),
    ("BUFFER_MAX_SIZE", "buffer.max_buffer_size", 200, "300", 300, 400),
    ("BUFFER_FLUSH_INTERVAL", "buffer.flush_interval", 5, "2.5", 2.5, 0.5),
    ("BUFFER_MAX_BATCH_SIZE", "buffer.max_batch_size", 20, "30", 30, 40),
    ("LOG_LEVEL", "logging.level", "WARNING", "DEBUG", "DEBUG", "ERROR"),
    ("SERVICE_LOG_LEVEL", "service.log_level", "WARNING", "DEBUG", "DEBUG", "ERROR"),
    ("DB_ECHO", "database.echo", False, "true", True, False),
    ("BUFFER_HARD_LIMIT", "buffer.hard_limit", 50_000, "60000", 60_000, 70_000),
]
ENV_IDS = [case[0] for case in ENV_CASES]


def _file_with(tmp_path: Path, dotted: str, value: Any) -> Path:
    section, key = dotted.split(".")
    return write_yaml(tmp_path, yaml.safe_dump({section: {key: value}}))


def _override(dotted: str, value: Any) -> dict[str, dict[str, Any]]:
    section, key = dotted.split(".")
    return {section: {key: value}}


@pytest.mark.parametrize(
    ("env", "dotted", "file_value", "env_value", "expected", "override"), ENV_CASES, ids=ENV_IDS
)
def test_environment_variable_sets_its_key(
    env: str, dotted: str, file_value: Any, env_value: str, expected: Any, override: Any
) -> None:
    default = value_at(Settings(), dotted)
    assert expected != default
    assert value_at(load_settings(environ={env: env_value}), dotted) == expected


@pytest.mark.parametrize(
    ("env", "dotted", "file_value", "env_value", "expected", "override"), ENV_CASES, ids=ENV_IDS
)
def test_file_beats_defaults(
    tmp_path: Path,
    env: str,
    dotted: str,
    file_value: Any,
    env_value: str,
    expected: Any,
    override: Any,
) -> None:
    path = _file_with(tmp_path, dotted, file_value)
    assert value_at(load_settings(path=path, environ={}), dotted) == file_value


@pytest.mark.parametrize(
    ("env", "dotted", "file_value", "env_value", "expected", "override"), ENV_CASES, ids=ENV_IDS
)
def test_environment_beats_file(
    tmp_path: Path,
    env: str,
    dotted: str,
    file_value: Any,
    env_value: str,
    expected: Any,
    override: Any,
) -> None:
    path = _file_with(tmp_path, dotted, file_value)
    assert value_at(load_settings(path=path, environ={env: env_value}), dotted) == expected


@pytest.mark.parametrize(
    ("env", "dotted", "file_value", "env_value", "expected", "override"), ENV_CASES, ids=ENV_IDS
)
def test_overrides_beat_environment_and_file(
    tmp_path: Path,
    env: str,
    dotted: str,
    file_value: Any,
    env_value: str,
    expected: Any,
    override: Any,
) -> None:
    path = _file_with(tmp_path, dotted, file_value)
    settings = load_settings(
        path=path, environ={env: env_value}, overrides=_override(dotted, override)
    )
    assert value_at(settings, dotted) == override


def test_layers_combine_key_by_key(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "service:\n  port: 9001\n  host: 10.0.0.1\ndatabase:\n  host: file-db\n  user: fileuser\n",
    )
    settings = load_settings(
        path=path,
        environ={"SERVICE_PORT": "9002", "DB_HOST": "env-db"},
        overrides={"database": {"host": "override-db"}},
    )
    assert settings.service.port == 9002  # environment over file
    assert settings.service.host == "10.0.0.1"  # file, nothing above it
    assert settings.database.host == "override-db"  # override over environment and file
    assert settings.database.user == "fileuser"  # file
    assert settings.database.port == 3306  # default


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings(environ={"PORT": "1", "HOST": "x", "DATABASE_URL": "mysql://a"})
    assert settings == Settings()


def test_environment_values_are_converted_to_their_types() -> None:
    settings = load_settings(
        environ={
            "SERVICE_PORT": " 8080 ",
            "BUFFER_FLUSH_INTERVAL": "12",
            "DB_ECHO": "yes",
            "SERVICE_RELOAD": "on",
            "DB_CREATE_TABLES": "0",
        }
    )
    assert settings.service.port == 8080
    assert type(settings.service.port) is int
    assert settings.buffer.flush_interval == 12.0
    assert type(settings.buffer.flush_interval) is float
    assert settings.database.echo is True
    assert settings.service.reload is True
    assert settings.database.create_tables is False


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
    ],
)
def test_boolean_spellings(raw: str, expected: bool) -> None:
    assert load_settings(environ={"DB_ECHO": raw}).database.echo is expected


def test_yaml_types_are_converted(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        'service:\n  port: "9001"\ndatabase:\n  password: 12345\n  port: 3307.0\n'
        "buffer:\n  flush_interval: 1\n",
    )
    settings = load_settings(path=path, environ={})
    assert settings.service.port == 9001
    assert settings.database.password == "12345"
    assert settings.database.port == 3307
    assert type(settings.database.port) is int
    assert settings.buffer.flush_interval == 1.0


def test_null_password_in_yaml_is_empty(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "database:\n  password:\n")
    assert load_settings(path=path, environ={}).database.password == ""


# --- list settings ---------------------------------------------------------------------------


def test_statuses_from_a_yaml_list(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "validation:\n  task_statuses: [queued, running, done]\n")
    settings = load_settings(path=path, environ={})
    assert settings.validation.task_statuses == ("queued", "running", "done")
    assert settings.validation.session_statuses == SPEC_DEFAULTS["validation.session_statuses"]


def test_statuses_from_a_comma_separated_yaml_string(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, 'validation:\n  task_statuses: "queued, running ,done,"\n')
    settings = load_settings(path=path, environ={})
    assert settings.validation.task_statuses == ("queued", "running", "done")


def test_statuses_from_a_comma_separated_override() -> None:
    settings = load_settings(
        environ={}, overrides={"validation": {"session_statuses": "draft,live"}}
    )
    assert settings.validation.session_statuses == ("draft", "live")


def test_statuses_from_a_list_override() -> None:
    settings = load_settings(environ={}, overrides={"validation": {"task_statuses": ["a", "b"]}})
    assert settings.validation.task_statuses == ("a", "b")


@pytest.mark.parametrize("value", ["", " , ", []])
def test_empty_status_list_is_an_error(value: Any) -> None:
    message = config_error(overrides={"validation": {"task_statuses": value}})
    assert "validation.task_statuses" in message
    assert "at least one status" in message


def test_status_longer_than_its_column_is_an_error() -> None:
    long = "s" * 21
    message = config_error(overrides={"validation": {"task_statuses": ["ok", long]}})
    assert "validation.task_statuses" in message
    assert long in message
    assert "1 to 20 characters" in message


def test_status_list_must_be_a_list(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "validation:\n  task_statuses: {a: 1}\n")
    message = config_error(path=path)
    assert "validation.task_statuses" in message
    assert "list of strings" in message


# --- bad values: one line naming the key, the value and what is allowed ---------------------


@pytest.mark.parametrize(
    ("env", "raw", "dotted", "allowed"),
    [
        ("SERVICE_PORT", "eighty", "service.port", "must be an integer"),
        ("SERVICE_PORT", "80.5", "service.port", "must be an integer"),
        ("SERVICE_PORT", "", "service.port", "must be an integer"),
        ("SERVICE_PORT", "0", "service.port", "between 1 and 65535"),
        ("SERVICE_PORT", "70000", "service.port", "between 1 and 65535"),
        ("DB_PORT", "-1", "database.port", "between 1 and 65535"),
        ("BUFFER_FLUSH_INTERVAL", "-1", "buffer.flush_interval", "between 0.1 and 86400"),
        ("BUFFER_FLUSH_INTERVAL", "0", "buffer.flush_interval", "between 0.1 and 86400"),
        ("BUFFER_FLUSH_INTERVAL", "soon", "buffer.flush_interval", "must be a number"),
        ("BUFFER_FLUSH_INTERVAL", "nan", "buffer.flush_interval", "between 0.1 and 86400"),
        ("BUFFER_MAX_SIZE", "0", "buffer.max_buffer_size", "between 1 and"),
        ("BUFFER_MAX_BATCH_SIZE", "many", "buffer.max_batch_size", "must be an integer"),
        ("SERVICE_WORKERS", "0", "service.workers", "between 1 and 64"),
        ("SERVICE_THREADS", "1000", "service.threads", "between 1 and 256"),
        ("DB_DRIVER", "postgres", "database.driver", "must be one of sqlite, mysql"),
        ("DB_HOST", "", "database.host", "must not be empty"),
        (
            "LOG_LEVEL",
            "LOUD",
            "logging.level",
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            "SERVICE_LOG_LEVEL",
            "TRACE",
            "service.log_level",
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ("DB_ECHO", "maybe", "database.echo", "must be true or false"),
        ("SERVICE_RELOAD", "2", "service.reload", "must be true or false"),
    ],
)
def test_bad_environment_value_names_key_value_source_and_rule(
    env: str, raw: str, dotted: str, allowed: str
) -> None:
    message = config_error(environ={env: raw})
    assert message.startswith(f"{dotted} = {raw!r}")
    assert f"(from {env})" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("yaml_text", "dotted", "shown", "allowed"),
    [
        ("service:\n  port: eighty\n", "service.port", "'eighty'", "must be an integer"),
        ("service:\n  port: 0\n", "service.port", "0", "between 1 and 65535"),
        ("service:\n  port: 70000\n", "service.port", "70000", "between 1 and 65535"),
        ("service:\n  port: 8001.5\n", "service.port", "8001.5", "must be an integer"),
        ("service:\n  port: true\n", "service.port", "True", "must be an integer"),
        ("buffer:\n  flush_interval: -5\n", "buffer.flush_interval", "-5", "between 0.1"),
        ("database:\n  driver: oracle\n", "database.driver", "'oracle'", "sqlite, mysql"),
        ("database:\n  echo: maybe\n", "database.echo", "'maybe'", "must be true or false"),
        ("logging:\n  level: chatty\n", "logging.level", "'chatty'", "DEBUG, INFO"),
        ("database:\n  host: [a, b]\n", "database.host", "['a', 'b']", "must be a string"),
    ],
)
def test_bad_file_value_names_key_value_and_rule(
    tmp_path: Path, yaml_text: str, dotted: str, shown: str, allowed: str
) -> None:
    message = config_error(path=write_yaml(tmp_path, yaml_text))
    assert message.startswith(f"{dotted} = {shown} (from config file)")
    assert allowed in message


def test_bad_override_value_names_key_value_and_rule() -> None:
    message = config_error(overrides={"service": {"port": 0}})
    assert message.startswith("service.port = 0 (from override)")
    assert "between 1 and 65535" in message


def test_bad_value_with_a_newline_stays_on_one_line() -> None:
    message = config_error(environ={"SERVICE_PORT": "80\n80"})
    assert "service.port = '80\\n80'" in message


def test_unknown_section_in_file_names_it_and_the_allowed_sections(tmp_path: Path) -> None:
    message = config_error(path=write_yaml(tmp_path, "databse:\n  host: x\n"))
    assert "databse" in message
    assert "unknown section" in message
    assert "service, buffer, database, validation, health, logging" in message


def test_unknown_section_in_overrides_is_an_error() -> None:
    message = config_error(overrides={"databse": {"host": "x"}})
    assert "'databse'" in message
    assert "service, buffer, database, validation, health, logging" in message


def test_unknown_key_in_file_names_the_dotted_key_and_the_allowed_keys(tmp_path: Path) -> None:
    message = config_error(path=write_yaml(tmp_path, "database:\n  hots: x\n"))
    assert message.startswith("database.hots: unknown setting")
    assert "host" in message.split("allowed are", 1)[1]
    assert "password" in message


def test_unknown_key_in_overrides_is_an_error() -> None:
    message = config_error(overrides={"buffer": {"max_size": 5}})
    assert message.startswith("buffer.max_size: unknown setting")
    assert "max_buffer_size" in message


def test_unknown_key_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    # A bad name is shown quoted, like a bad value, so the message stays one line.
    message = config_error(path=write_yaml(tmp_path, 'database:\n  "ho\\nst": x\n'))
    assert "unknown setting" in message


def test_section_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    message = config_error(path=write_yaml(tmp_path, "service:\n  - port\n"))
    assert message.startswith("service")
    assert "mapping of settings" in message


@pytest.mark.parametrize(
    "text",
    ["service: [unclosed\n", "service:\n  port: 1\n port: 2\n", "a: b: c\n", "\tservice: {}\n"],
)
def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    message = config_error(path=path)
    assert str(path) in message
    assert "cannot be read as YAML" in message


@pytest.mark.parametrize("text", ["- service\n- buffer\n", "just text\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    message = config_error(path=path)
    assert str(path) in message
    assert "must hold a mapping of sections" in message


@pytest.mark.parametrize(
    ("environ", "hard_limit", "needed"),
    [
        ({"BUFFER_HARD_LIMIT": "1999"}, 1999, 2000),
        ({"BUFFER_MAX_SIZE": "60000", "BUFFER_MAX_BATCH_SIZE": "50000"}, 100_000, 110_000),
    ],
)
def test_hard_limit_below_buffer_plus_batch_is_an_error(
    environ: dict[str, str], hard_limit: int, needed: int
) -> None:
    message = config_error(environ=environ)
    assert message.startswith(f"buffer.hard_limit = {hard_limit}")
    assert "max_buffer_size + max_batch_size" in message
    assert f"({needed})" in message


def test_hard_limit_equal_to_buffer_plus_batch_is_accepted() -> None:
    settings = load_settings(environ={"BUFFER_HARD_LIMIT": "2000"})
    assert settings.buffer.hard_limit == 2000


def test_retry_backoff_max_below_initial_is_an_error() -> None:
    message = config_error(
        environ={"BUFFER_RETRY_BACKOFF_INITIAL": "10", "BUFFER_RETRY_BACKOFF_MAX": "5"}
    )
    assert message.startswith("buffer.retry_backoff_max = 5.0")
    assert "retry_backoff_initial (10.0)" in message


def test_a_pool_smaller_than_the_flush_connections_is_an_error() -> None:
    message = config_error(
        environ={"DB_DRIVER": "mysql", "DB_POOL_SIZE": "2", "DB_FLUSH_CONNECTIONS": "3"}
    )
    assert message.startswith("database.pool_size = 2")
    assert "database.flush_connections (3)" in message


def test_a_pool_of_one_connection_is_accepted_when_flushes_use_one() -> None:
    settings = load_settings(
        environ={"DB_DRIVER": "mysql", "DB_POOL_SIZE": "1", "DB_FLUSH_CONNECTIONS": "1"}
    )
    assert (settings.database.pool_size, settings.database.flush_connections) == (1, 1)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- describe() ------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55!"


def test_describe_mysql_names_the_database_without_the_password() -> None:
    settings = load_settings(
        environ={
            "DB_DRIVER": "mysql",
            "DB_HOST": "db.internal",
            "DB_PORT": "3307",
            "DB_USER": "svc",
            "DB_PASSWORD": SECRET,
            "DB_DATABASE": "terminal",
        }
    )
    text = describe(settings)
    assert text == (
        "mysql svc@db.internal:3307/terminal, "
        "TLS not required (unverified if the server offers it, else plain text)"
    )
    assert SECRET not in text


def test_describe_sqlite_names_the_file_without_the_password() -> None:
    settings = load_settings(
        environ={"DB_PASSWORD": SECRET}, overrides={"database": {"sqlite_path": "x/p.db"}}
    )
    text = describe(settings)
    assert text == "sqlite file x/p.db"
    assert SECRET not in text


@pytest.mark.parametrize("driver", ["sqlite", "mysql"])
def test_describe_never_contains_the_password_even_when_it_is_short(driver: str) -> None:
    # A password that shares no text with the other settings.
    settings = load_settings(environ={"DB_DRIVER": driver, "DB_PASSWORD": "Qz9#"})
    assert "Qz9#" not in describe(settings)


# --- secrets from files ----------------------------------------------------------------------


def secret_file(tmp_path: Path, content: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("s3cr3t\n", "s3cr3t"),
        ("s3cr3t", "s3cr3t"),
        ("s3cr3t\r\n", "s3cr3t"),
        ("two lines\n\n", "two lines\n"),  # one newline only, as the database images do
        ("  spaced \n", "  spaced "),
        ("", ""),
    ],
)
def test_password_file_gives_its_content_less_one_trailing_newline(
    tmp_path: Path, content: str, expected: str
) -> None:
    environ = {"DB_PASSWORD_FILE": secret_file(tmp_path, content)}
    assert load_settings(environ=environ).database.password == expected


def test_a_secret_file_beats_the_config_file_and_loses_to_an_override(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "database: {password: from-yaml}\n")
    environ = {"DB_PASSWORD_FILE": secret_file(tmp_path, "from-file\n")}
    assert load_settings(path=path, environ=environ).database.password == "from-file"
    settings = load_settings(
        path=path, environ=environ, overrides={"database": {"password": "override"}}
    )
    assert settings.database.password == "override"


def test_a_secret_and_its_file_both_set_is_an_error(tmp_path: Path) -> None:
    environ = {"DB_PASSWORD": "Zq81-visible", "DB_PASSWORD_FILE": secret_file(tmp_path, "pw")}
    message = config_error(environ=environ)
    assert message == (
        "database.password: DB_PASSWORD and DB_PASSWORD_FILE are both set; set one of them"
    )
    tokens = {"SERVICE_AUTH_TOKENS": "abc", "SERVICE_AUTH_TOKENS_FILE": "/run/secrets/tokens"}
    assert "SERVICE_AUTH_TOKENS and SERVICE_AUTH_TOKENS_FILE" in config_error(environ=tokens)


def test_an_unreadable_secret_file_names_the_variable_and_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    message = config_error(environ={"DB_PASSWORD_FILE": missing})
    assert message == (
        f"DB_PASSWORD_FILE = {missing!r}: the file cannot be read (No such file or directory)"
    )
    message = config_error(environ={"DB_PASSWORD_FILE": str(tmp_path)})
    assert message.startswith(f"DB_PASSWORD_FILE = {str(tmp_path)!r}: the file cannot be read")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    message = config_error(environ={"SERVICE_AUTH_TOKENS_FILE": str(binary)})
    assert message.endswith("the file cannot be read (not UTF-8 text)")


def test_only_secret_settings_are_read_from_files(tmp_path: Path) -> None:
    environ = {"DB_HOST_FILE": secret_file(tmp_path, "db.from-file"), "DB_USER": "svc"}
    settings = load_settings(environ=environ)
    assert settings.database.host == "localhost"
    assert settings.database.user == "svc"


def test_auth_tokens_default_to_none_and_come_comma_separated_from_the_environment() -> None:
    assert load_settings(environ={}).service.auth_tokens == ()
    environ = {"SERVICE_AUTH_TOKENS": "old-token_1, new.token~2=="}
    assert load_settings(environ=environ).service.auth_tokens == ("old-token_1", "new.token~2==")


def test_auth_tokens_file_holds_one_token_per_line(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "old-token\r\n\n  new/token+2=  \n")
    settings = load_settings(environ={"SERVICE_AUTH_TOKENS_FILE": path})
    assert settings.service.auth_tokens == ("old-token", "new/token+2=")


@pytest.mark.parametrize("bad", ["has space", "semi;colon", "=leading", 'quote"d', "tab\tbed"])
def test_an_invalid_token_is_an_error_that_never_shows_it(tmp_path: Path, bad: str) -> None:
    path = secret_file(tmp_path, f"good-token\n{bad}\n")
    message = config_error(environ={"SERVICE_AUTH_TOKENS_FILE": path})
    assert message.startswith(
        "service.auth_tokens = <secret> (from SERVICE_AUTH_TOKENS_FILE): "
        "token 2 of 2 is not a bearer token"
    )
    for part in bad.split():
        assert part not in message
    assert "good-token" not in message


def test_a_secret_of_the_wrong_type_is_an_error_that_never_shows_it(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "database: {password: [Zq81, visible]}\n")
    message = config_error(path=path)
    assert message == "database.password = <secret> (from config file): must be a string"


def test_secrets_are_left_out_of_the_settings_repr(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "DB_PASSWORD_FILE": secret_file(tmp_path, "Zq81-db-password\n"),
            "SERVICE_AUTH_TOKENS": "Zq81-token-one,Zq81-token-two",
        }
    )
    assert settings.database.password == "Zq81-db-password"
    assert "Zq81" not in repr(settings)
    assert "ssl_ca=''" in repr(settings)  # the other settings are still shown


# --- TLS files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def mysql_tls(**env: str) -> dict[str, str]:
    return {"DB_DRIVER": "mysql", **env}


def test_database_tls_files_that_fit_together_load(certs: CertSet) -> None:
    settings = load_settings(
        environ=mysql_tls(
            DB_SSL_CA=str(certs.ca.cert),
            DB_SSL_CERT=str(certs.client.cert),
            DB_SSL_KEY=str(certs.client.key),
            DB_SSL_VERIFY_IDENTITY="false",
        )
    )
    db = settings.database
    assert (db.ssl_ca, db.ssl_cert, db.ssl_key) == tuple(
        str(p) for p in (certs.ca.cert, certs.client.cert, certs.client.key)
    )
    assert db.ssl_verify_identity is False
    assert load_settings(environ={}).database.ssl_verify_identity is True


def test_a_certificate_file_holding_its_key_needs_no_key_file(
    certs: CertSet, tmp_path: Path
) -> None:
    both = tmp_path / "client-and-key.pem"
    both.write_bytes(certs.client.cert.read_bytes() + certs.client.key.read_bytes())
    settings = load_settings(environ=mysql_tls(DB_SSL_CA=str(certs.ca.cert), DB_SSL_CERT=str(both)))
    assert settings.database.ssl_key == ""


def test_a_missing_or_unreadable_tls_file_is_a_one_line_error(
    certs: CertSet, tmp_path: Path
) -> None:
    missing = str(tmp_path / "ca.pem")
    assert config_error(environ=mysql_tls(DB_SSL_CA=missing)) == (
        f"database.ssl_ca = {missing!r}: cannot be read (No such file or directory)"
    )
    message = config_error(environ=mysql_tls(DB_SSL_CA=str(tmp_path)))
    assert message == f"database.ssl_ca = {str(tmp_path)!r}: cannot be read (Is a directory)"
    message = config_error(
        environ=mysql_tls(
            DB_SSL_CA=str(certs.ca.cert), DB_SSL_CERT=str(certs.client.cert), DB_SSL_KEY=missing
        )
    )
    assert message.startswith(f"database.ssl_key = {missing!r}: cannot be read")


def test_a_file_that_is_not_what_it_should_be_is_a_one_line_error(
    certs: CertSet, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n", encoding="utf-8")
    message = config_error(environ=mysql_tls(DB_SSL_CA=str(text)))
    assert message.startswith(f"database.ssl_ca = {str(text)!r}: holds no PEM certificate (")
    ca = str(certs.ca.cert)
    message = config_error(
        environ=mysql_tls(
            DB_SSL_CA=ca, DB_SSL_CERT=str(certs.client.cert), DB_SSL_KEY=str(certs.server.key)
        )
    )
    assert message.startswith(
        f"database.ssl_cert = {str(certs.client.cert)!r}: must be a PEM certificate, and "
        "database.ssl_key its PEM private key"
    )
    assert "KEY_VALUES_MISMATCH" in message
    message = config_error(environ=mysql_tls(DB_SSL_CA=ca, DB_SSL_CERT=str(certs.client.cert)))
    assert "must be a PEM certificate" in message  # and no key with it


def test_an_encrypted_key_is_refused_at_start_instead_of_prompting(
    certs: CertSet, tmp_path: Path
) -> None:
    encrypted = tmp_path / "encrypted-key.pem"
    subprocess.run(
        [openssl_or_skip(), "pkey", "-in", str(certs.client.key), "-aes256", "-passout", "pass:pw",
         "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    message = config_error(
        environ=mysql_tls(
            DB_SSL_CA=str(certs.ca.cert),
            DB_SSL_CERT=str(certs.client.cert),
            DB_SSL_KEY=str(encrypted),
        )
    )
    assert message == (
        f"database.ssl_key = {str(encrypted)!r}: the private key is encrypted; "
        "give it unencrypted, in a file only the service can read"
    )


def test_database_tls_settings_that_do_not_fit_together_are_errors(certs: CertSet) -> None:
    key = str(certs.client.key)
    assert config_error(environ=mysql_tls(DB_SSL_CA=str(certs.ca.cert), DB_SSL_KEY=key)) == (
        f"database.ssl_key = {key!r}: needs database.ssl_cert (the certificate of the key)"
    )
    cert = str(certs.client.cert)
    message = config_error(environ=mysql_tls(DB_SSL_CERT=cert, DB_SSL_KEY=key))
    assert message.startswith(f"database.ssl_cert = {cert!r}: needs database.ssl_ca")


def test_database_tls_files_are_not_checked_for_sqlite(tmp_path: Path) -> None:
    settings = load_settings(environ={"DB_SSL_CA": str(tmp_path / "missing.pem")})
    assert settings.database.driver == "sqlite"


def test_listener_tls_settings(certs: CertSet, tmp_path: Path) -> None:
    cert, key, ca = (str(p) for p in (certs.server.cert, certs.server.key, certs.ca.cert))
    settings = load_settings(
        environ={"SERVICE_TLS_CERT": cert, "SERVICE_TLS_KEY": key, "SERVICE_TLS_CLIENT_CA": ca}
    )
    assert (settings.service.tls_cert, settings.service.tls_key) == (cert, key)
    assert settings.service.tls_client_ca == ca
    assert config_error(environ={"SERVICE_TLS_KEY": key}) == (
        f"service.tls_key = {key!r}: needs service.tls_cert (the certificate of the key)"
    )
    assert config_error(environ={"SERVICE_TLS_CLIENT_CA": ca}).startswith(
        f"service.tls_client_ca = {ca!r}: needs service.tls_cert"
    )
    missing = str(tmp_path / "server.pem")
    assert config_error(environ={"SERVICE_TLS_CERT": missing, "SERVICE_TLS_KEY": key}) == (
        f"service.tls_cert = {missing!r}: cannot be read (No such file or directory)"
    )
    other = make_leaf(tmp_path, "other", make_ca(tmp_path, "ca2"), alt_names="DNS:localhost")
    message = config_error(environ={"SERVICE_TLS_CERT": cert, "SERVICE_TLS_KEY": str(other.key)})
    assert "KEY_VALUES_MISMATCH" in message


def test_describe_says_what_tls_the_database_connection_requires(certs: CertSet) -> None:
    ca, cert, key = (str(p) for p in (certs.ca.cert, certs.client.cert, certs.client.key))
    base = {"DB_DRIVER": "mysql", "DB_HOST": "db", "DB_USER": "svc", "DB_DATABASE": "t"}
    verified = load_settings(environ={**base, "DB_SSL_CA": ca})
    assert describe(verified) == (
        f"mysql svc@db:3306/t, TLS required, server certificate must verify against {ca} "
        "and name the host"
    )
    chain_only = load_settings(
        environ={
            **base,
            "DB_SSL_CA": ca,
            "DB_SSL_VERIFY_IDENTITY": "off",
            "DB_SSL_CERT": cert,
            "DB_SSL_KEY": key,
        }
    )
    assert describe(chain_only) == (
        f"mysql svc@db:3306/t, TLS required, server certificate must verify against {ca}, "
        f"host name NOT checked, client certificate {cert}"
    )


# --- the shipped config.yaml -----------------------------------------------------------------


def test_shipped_config_loads() -> None:
    settings = load_settings(path=SHIPPED_CONFIG, environ={})
    assert settings.source == str(SHIPPED_CONFIG)


def _shipped_keys() -> list[str]:
    data = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    return [f"{section}.{key}" for section, values in data.items() for key in values or {}]


@pytest.mark.parametrize("dotted", _shipped_keys())
def test_shipped_config_equals_the_defaults(dotted: str) -> None:
    shipped = load_settings(path=SHIPPED_CONFIG, environ={})
    assert value_at(shipped, dotted) == value_at(Settings(), dotted)


def test_shipped_config_sets_every_key_the_spec_names() -> None:
    keys = set(_shipped_keys())
    assert set(SPEC_DEFAULTS) <= keys


def test_shipped_config_as_a_whole_equals_the_defaults() -> None:
    shipped = load_settings(path=SHIPPED_CONFIG, environ={})
    assert dataclasses.replace(shipped, source="defaults") == Settings()
