"""Logging: several processes share one rotating file; an empty logging.file means stderr only."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persistence.config import LoggingSettings
from persistence.logs import configure_logging
from tests.gunicorn_server import REPO

MAX_BYTES = 2048
WRITERS = 4
LINES = 300

# One writer process: waits for the start signal, then logs LINES numbered lines.
WRITER = """
import logging, os, sys, time
from persistence.config import LoggingSettings
from persistence.logs import configure_logging

path, writer, lines, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
configure_logging(LoggingSettings(
    file=path, max_bytes=int(sys.argv[5]), backup_count=10000, format="json"
))
while not os.path.exists(go):
    time.sleep(0.005)
log = logging.getLogger("persistence.writer")
for n in range(lines):
    log.info("writer %s line %05d %s", writer, n, "x" * 40)
"""


def test_several_processes_rotate_one_file_without_losing_or_misplacing_a_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "logs" / "service.log"
    go = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(n), str(LINES), str(go), str(MAX_BYTES)],
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        for n in range(WRITERS)
    ]
    time.sleep(0.5)  # let them import and open the file: the writes then overlap
    go.touch()
    assert [writer.wait(timeout=60) for writer in writers] == [0] * WRITERS

    files = [path, *sorted(path.parent.glob("service.log.*[0-9]"))]
    lines = [
        json.loads(line)["message"]
        for file in files
        for line in file.read_text(encoding="utf-8").splitlines()
    ]
    expected = [f"writer {n} line {i:05d} {'x' * 40}" for n in range(WRITERS) for i in range(LINES)]
    assert sorted(lines) == sorted(expected)  # each line once: none lost, none doubled
    assert len(files) > 10  # it did rotate, many times
    # No process kept writing into a file another one had rotated away.
    assert max(file.stat().st_size for file in files) < MAX_BYTES


def test_an_empty_log_file_setting_logs_to_stderr_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    configure_logging(LoggingSettings(file=""))
    logging.getLogger("persistence.test").warning("to stderr")
    assert "to stderr" in capsys.readouterr().err
    handlers = logging.getLogger("persistence").handlers
    assert not any(isinstance(h, logging.FileHandler) for h in handlers)
    assert list(tmp_path.iterdir()) == []
