"""The start-up check of the directories the service writes to (persistence/datadir.py).

The case that matters is a directory that belongs to someone else, like a
root-owned bind mount in a container whose service runs as uid 10001. Run as
root, these tests give the directory to ``nobody`` and run the service as
root without the capabilities that override file permissions (so that root
is held to them like any user); run as another user, they take the write
permission away from that user's own directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from persistence.config import load_settings
from persistence.datadir import BOOT_FAILURE_STATUS, data_directories, require_writable
from tests.gunicorn_server import REPO, free_port, gunicorn_command, service_env

NOBODY = 65534
AS_ROOT = os.geteuid() == 0
# Root, held to file permissions like any other user.
WITHOUT_OVERRIDES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@dataclass
class Foreign:
    """A directory the service's user cannot create files in, and how to run as that user."""

    base: Path  # the working directory of what runs
    directory: Path  # not writable by that user
    uid: int
    gid: int

    def command(self, *argv: str) -> list[str]:
        return [*WITHOUT_OVERRIDES, *argv] if AS_ROOT else list(argv)


@pytest.fixture
def foreign(tmp_path: Path) -> Iterator[Foreign]:
    if AS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to hold root to file permissions")
    directory = tmp_path / "data"
    directory.mkdir(mode=0o755)
    if AS_ROOT:
        os.chown(directory, NOBODY, NOBODY)
    else:
        directory.chmod(0o555)
    try:
        yield Foreign(tmp_path, directory, os.geteuid(), os.getegid())
    finally:
        directory.chmod(0o755)


CHECK = (
    "from persistence.config import load_settings\n"
    "from persistence.datadir import require_writable\n"
    "from persistence.logs import configure_logging\n"
    "settings = load_settings()\n"
    "configure_logging(settings.logging)\n"
    "require_writable(settings)\n"
    "print('writable')\n"
)


def run_check(where: Foreign, **env: str) -> subprocess.CompletedProcess[str]:
    """The check as the service's user, with the service's settings from ``env``."""
    return subprocess.run(
        where.command(sys.executable, "-c", CHECK),
        cwd=where.base,
        env={"PYTHONPATH": str(REPO), "LOG_FILE": "", "LOG_FORMAT": "text", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def messages(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The messages of the log lines on stderr (text format: after the logger's name)."""
    return [line.split(": ", 1)[1] if ": " in line else line for line in result.stderr.splitlines()]


def owner_text(path: Path) -> tuple[str, str]:
    info = os.stat(path)
    owner = f"uid {info.st_uid}, gid {info.st_gid}, mode {stat.S_IMODE(info.st_mode):o}"
    return owner, f"{info.st_uid}:{info.st_gid}"


# --- which directories --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DB_DRIVER": "mysql"}, []),
        ({"DB_DRIVER": "sqlite"}, [("database.sqlite_path", Path("data"))]),
        (
            {"DB_DRIVER": "mysql", "BUFFER_DURABILITY": "journal"},
            [("buffer.journal_dir", Path("data/journal"))],
        ),
        (
            {"DB_SQLITE_PATH": "/srv/db/p.db", "BUFFER_DURABILITY": "journal"},
            [
                ("database.sqlite_path", Path("/srv/db")),
                ("buffer.journal_dir", Path("data/journal")),
            ],
        ),
    ],
)
def test_data_directories_follow_the_settings(
    env: dict[str, str], expected: list[tuple[str, Path]]
) -> None:
    assert data_directories(load_settings(path=REPO / "config.yaml", environ=env)) == expected


# --- writable -----------------------------------------------------------------------------


def test_writable_directories_pass_and_stay_as_they_were(tmp_path: Path) -> None:
    (tmp_path / "kept").write_text("x")
    settings = load_settings(
        environ={
            "DB_SQLITE_PATH": str(tmp_path / "not" / "yet" / "service.db"),
            "BUFFER_DURABILITY": "journal",
            "BUFFER_JOURNAL_DIR": str(tmp_path / "journal"),
        }
    )
    require_writable(settings)
    # Nothing created: the service creates its directories itself, later.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# --- not writable -------------------------------------------------------------------------


def test_a_foreign_sqlite_directory_is_one_line_with_owner_uid_and_fix(foreign: Foreign) -> None:
    result = run_check(foreign, DB_SQLITE_PATH=str(foreign.directory / "persistence.db"))
    assert result.returncode == BOOT_FAILURE_STATUS, result.stdout + result.stderr
    owner, owner_ids = owner_text(foreign.directory)
    ids = f"{foreign.uid}:{foreign.gid}"
    assert messages(result) == [
        f"cannot write to {foreign.directory} (database.sqlite_path): it belongs to {owner}, "
        f"and the service runs as uid {foreign.uid}; give it to that user (chown -R {ids} "
        f"on the host directory of a bind mount), or run the service as its owner "
        f"(docker run --user {owner_ids})"
    ]
    assert result.stdout == ""


def test_a_journal_to_be_created_in_a_foreign_directory(foreign: Foreign) -> None:
    journal = foreign.directory / "journal"
    result = run_check(
        foreign, DB_DRIVER="mysql", BUFFER_DURABILITY="journal", BUFFER_JOURNAL_DIR=str(journal)
    )
    assert result.returncode == BOOT_FAILURE_STATUS
    [line] = messages(result)
    # The directory that exists, where the journal's would have to be created.
    assert line.startswith(f"cannot write to {foreign.directory} (buffer.journal_dir): ")
    assert f"the service runs as uid {foreign.uid}" in line


def test_a_sqlite_file_that_cannot_be_written(foreign: Foreign) -> None:
    # The directory lets the service in, the file left by another user does not.
    foreign.directory.chmod(0o777 if AS_ROOT else 0o755)
    db = foreign.directory / "persistence.db"
    db.write_bytes(b"")
    db.chmod(0o644 if AS_ROOT else 0o444)
    if AS_ROOT:
        os.chown(db, NOBODY, NOBODY)
    result = run_check(foreign, DB_SQLITE_PATH=str(db))
    assert result.returncode == BOOT_FAILURE_STATUS
    [line] = messages(result)
    owner, _ = owner_text(db)
    assert line.startswith(f"cannot write to {db} (database.sqlite_path): it belongs to {owner}")


def test_memory_mode_on_mysql_writes_nothing_and_needs_nothing(foreign: Foreign) -> None:
    result = run_check(foreign, DB_DRIVER="mysql", DB_SQLITE_PATH=str(foreign.directory / "x.db"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "writable\n"


# --- under gunicorn -----------------------------------------------------------------------


def test_gunicorn_stops_at_once_instead_of_serving_503s(foreign: Foreign) -> None:
    port = free_port()
    env = service_env(foreign.base, DB_SQLITE_PATH=str(foreign.directory / "persistence.db"))
    process = subprocess.Popen(
        foreign.command(*gunicorn_command("-b", f"127.0.0.1:{port}")),
        cwd=foreign.base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        pytest.fail(f"gunicorn kept running:\n{output}")
    # gunicorn's "worker failed to boot": the master stops too.
    assert process.returncode == BOOT_FAILURE_STATUS, output
    assert "Reason: Worker failed to boot." in output
    critical = [line for line in output.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1, output
    assert f"cannot write to {foreign.directory} (database.sqlite_path)" in critical[0]
    assert "Traceback" not in output
    # Left no half-started worker behind.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the gunicorn group are still running")
