"""The control directory: private to the user, refused otherwise, removed with the master."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persistence.control import (
    ControlDirectoryError,
    ControlServer,
    ask,
    check_private_directory,
    create_control_directory,
)
from tests.gunicorn_server import API, wait_for


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """A temporary directory short enough to hold Unix sockets (pytest's are too deep)."""
    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as name:
        yield Path(name)


def test_a_new_control_directory_is_private_and_unpredictable(
    short_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path = short_tmpdir
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, second = create_control_directory(), create_control_directory()
    assert first != second
    for path in (first, second):
        info = path.lstat()
        assert path.parent == tmp_path
        assert stat.S_ISDIR(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        check_private_directory(path)


def planted(tmp_path: Path, kind: str) -> Path:
    """A directory someone else prepared for us."""
    path = tmp_path / "persistence-service-1234"
    if kind == "open to all":
        path.mkdir()
        path.chmod(0o777)
    elif kind == "readable by the group":
        path.mkdir(mode=0o750)
        path.chmod(0o750)
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    elif kind == "a file":
        path.write_text("")
    elif kind == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    return path


@pytest.mark.parametrize(
    "kind",
    ["open to all", "readable by the group", "symlink", "a file", "another user's", "missing"],
)
def test_a_control_directory_that_is_not_private_is_refused(tmp_path: Path, kind: str) -> None:
    path = planted(tmp_path, kind)
    with pytest.raises(ControlDirectoryError, match="control directory"):
        check_private_directory(path)
    server = ControlServer(path, lambda op: {"op": op})
    with pytest.raises(ControlDirectoryError):
        server.start()
    assert not (path / f"worker-{os.getpid()}.sock").exists()


def test_the_control_server_answers_in_a_private_directory(tmp_path: Path) -> None:
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    server = ControlServer(path, lambda op: {"echo": op})
    server.start()
    try:
        assert ask(server.path, "stats", timeout=5) == {"echo": "stats"}
    finally:
        server.stop()


def test_a_temporary_directory_too_deep_for_unix_sockets_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ControlDirectoryError, match="TMPDIR"):
        create_control_directory()
    assert list(deep.iterdir()) == []


@pytest.mark.e2e
def test_gunicorn_uses_a_private_control_directory_and_removes_it(
    start_server: Any, short_tmpdir: Path
) -> None:
    run = short_tmpdir
    server = start_server(SERVICE_WORKERS="2", TMPDIR=str(run))
    assert wait_for(lambda: server.get(f"{API}/stats").json()["workers"]["count"] == 2)
    directories = list(run.glob("persistence-service-*"))
    assert len(directories) == 1
    info = directories[0].lstat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.geteuid())
    assert len(list(directories[0].glob("worker-*.sock"))) == 2
    assert server.stop() == 0
    assert not directories[0].exists()
