"""A 3-node MariaDB Galera cluster on 127.0.0.1 for tests, and the fixture that runs it.

Each node has its own data directory under one temporary directory and its own
ports (MySQL, Galera replication, IST, SST). The first node is created with
``mariadb-install-db`` and bootstraps the cluster (``--wsrep-new-cluster``);
the others join it by rsync SST, in parallel. The nodes run as the ``mysql``
user when the tests run as root: as root, the joiner's rsync daemon drops to
``nobody`` and the SST fails. Every node is stopped by its process id.

Memory is kept small (32 MiB buffer pool, small caches) and the failure
detector quick (a silent peer is suspected after 2 s instead of 5 s), so that
the cluster fits next to everything else on a 2-core machine and the tests
that stop nodes take seconds.

Without galera-4 (``libgalera_smm.so``), ``mariadbd``, ``mariadb-install-db`` or
``rsync``, the fixture skips with the reason; under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import pytest

from tests.conftest import IN_CI, REAL_CONNECT, MysqlServer
from tests.gunicorn_server import free_port

PROVIDERS = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so")
SERVER_BINARIES = ("mariadbd", "mariadb-install-db", "rsync")
CLUSTER_NAME = "persistence-test"
# Seconds a node may take to start, join (SST) or rejoin (IST).
START_TIMEOUT = 90.0
# wsrep_local_state 4: the node is Synced and accepts writes.
SYNCED = "4"


def missing_software() -> str | None:
    """What is missing to run a Galera cluster here, or None."""
    if not any(Path(p).exists() for p in PROVIDERS):
        return "galera-4 is not installed (no libgalera_smm.so)"
    for binary in SERVER_BINARIES:
        if shutil.which(binary) is None and not Path("/usr/sbin", binary).exists():
            return f"{binary} is not installed"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class GaleraNode:
    """One mariadbd of the cluster: its directory, its ports and its process."""

    name: str
    directory: Path
    port: int
    galera_port: int
    ist_port: int
    sst_port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def config(self) -> Path:
        return self.directory / "node.cnf"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as ``DB_HOST`` lists it."""
        return f"127.0.0.1:{self.port}"

    @property
    def server(self) -> MysqlServer:
        return MysqlServer("127.0.0.1", self.port, "root", "")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.error_log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, str]:
        """The node's ``wsrep_%`` status variables (raises when it does not answer)."""
        conn = REAL_CONNECT(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            connect_timeout=2,
            read_timeout=2,
        )
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep%'")
                return {str(name): str(value) for name, value in cur.fetchall()}
        finally:
            conn.close()

    def synced(self) -> bool:
        try:
            status = self.status()
        except pymysql.MySQLError:
            return False
        return (
            status.get("wsrep_local_state") == SYNCED
            and status.get("wsrep_ready") == "ON"
            and status.get("wsrep_cluster_status") == "Primary"
        )


class GaleraCluster:
    """Three Galera nodes on 127.0.0.1. Not thread-safe: one test drives it at a time."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        self.provider = next(p for p in PROVIDERS if Path(p).exists())
        self.run_as = "mysql" if os.geteuid() == 0 else None
        self.nodes = [
            GaleraNode(
                f"node{i + 1}",
                base / f"node{i + 1}",
                free_port(),
                free_port(),
                free_port(),
                free_port(),
            )
            for i in range(size)
        ]

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Create the first node, bootstrap the cluster with it, then join the others."""
        for node in self.nodes:
            node.datadir.mkdir(parents=True)
            node.config.write_text(self._config(node), encoding="utf-8")
        self._own(self.base)
        first = self.nodes[0]
        self._install(first)
        self._launch(first, "--wsrep-new-cluster")
        self.wait_synced(first)
        joiners = self.nodes[1:]
        for node in joiners:
            self._launch(node)
        for node in joiners:
            self.wait_synced(node)

    def shutdown(self) -> None:
        """Stop every node by its process id (SIGTERM, then SIGKILL after 30 s)."""
        for node in self.nodes:
            if node.running:
                assert node.process is not None
                os.kill(node.process.pid, signal.SIGCONT)
                node.process.terminate()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def kill(self, node: GaleraNode) -> None:
        """SIGKILL the node: a crash (no clean leave from the cluster)."""
        assert node.process is not None
        node.process.kill()
        node.process.wait()

    def freeze(self, node: GaleraNode) -> None:
        """SIGSTOP the node: it holds its connections but answers nothing."""
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGSTOP)

    def thaw(self, node: GaleraNode) -> None:
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGCONT)

    def rejoin(self, node: GaleraNode) -> str:
        """Restart a node that crashed so that it rejoins by IST; its recovered position.

        A crashed node's grastate.dat has no position (seqno -1); ``--wsrep-recover``
        reads it from InnoDB, and starting from it lets a donor send only the
        write sets the node missed (IST) instead of a whole copy (SST).
        """
        assert not node.running
        position = self._recover_position(node)
        self._launch(node, f"--wsrep-start-position={position}")
        self.wait_synced(node)
        return position

    def ensure_healthy(self) -> None:
        """Bring every node back (thawed, restarted) and wait until all are Synced."""
        for node in self.nodes:
            if node.running:
                self.thaw(node)
        for node in self.nodes:
            if not node.running:
                self.rejoin(node)
        for node in self.nodes:
            self.wait_synced(node)

    def wait_synced(self, node: GaleraNode, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.running:
                raise AssertionError(f"{node.name} exited:\n{node.log_text()[-4000:]}")
            if node.synced():
                return
            time.sleep(0.2)
        raise AssertionError(f"{node.name} not Synced in {timeout:g} s:\n{node.log_text()[-4000:]}")

    def hosts(self, *order: int) -> str:
        """``DB_HOST`` listing the nodes of ``order`` (indexes), e.g. ``hosts(1, 2, 0)``."""
        return ",".join(self.nodes[i].address for i in order)

    # --- internals ------------------------------------------------------------------------

    def _config(self, node: GaleraNode) -> str:
        members = ",".join(f"127.0.0.1:{n.galera_port}" for n in self.nodes)
        provider_options = ";".join(
            (
                f"gmcast.listen_addr=tcp://127.0.0.1:{node.galera_port}",
                f"ist.recv_addr=127.0.0.1:{node.ist_port}",
                "gcache.size=32M",
                "evs.keepalive_period=PT0.5S",
                "evs.suspect_timeout=PT2S",
                "evs.inactive_timeout=PT4S",
                "evs.install_timeout=PT4S",
            )
        )
        user = f"user={self.run_as}\n" if self.run_as else ""
        return f"""[mariadbd]
{user}datadir={node.datadir}
socket={node.directory}/mysqld.sock
pid-file={node.directory}/mysqld.pid
log-error={node.error_log}
port={node.port}
bind-address=127.0.0.1
performance_schema=OFF
innodb_buffer_pool_size=32M
innodb_log_file_size=16M
innodb_log_buffer_size=4M
innodb_flush_log_at_trx_commit=2
aria_pagecache_buffer_size=8M
key_buffer_size=1M
max_connections=200
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider={self.provider}
wsrep_cluster_name={CLUSTER_NAME}
wsrep_cluster_address=gcomm://{members}
wsrep_node_name={node.name}
wsrep_node_address=127.0.0.1:{node.galera_port}
wsrep_node_incoming_address=127.0.0.1:{node.port}
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:{node.sst_port}
wsrep_provider_options="{provider_options}"
wsrep_slave_threads=2
"""

    def _own(self, path: Path) -> None:
        if self.run_as is None:
            return
        user = pwd.getpwnam(self.run_as)
        for root, dirs, files in os.walk(path):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)

    def _install(self, node: GaleraNode) -> None:
        command = [
            _binary("mariadb-install-db"),
            f"--defaults-file={node.config}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--wsrep-on=OFF",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _launch(self, node: GaleraNode, *args: str) -> None:
        with (node.directory / "stdout.log").open("ab") as out:
            node.process = subprocess.Popen(
                [_binary("mariadbd"), f"--defaults-file={node.config}", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _recover_position(self, node: GaleraNode) -> str:
        logged_before = len(node.log_text())
        done = subprocess.run(
            [_binary("mariadbd"), f"--defaults-file={node.config}", "--wsrep-recover"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        # mariadbd prints the position on its console or in its error log.
        console = (done.stdout + done.stderr).decode("utf-8", errors="replace")
        text = console + node.log_text()[logged_before:]
        found = re.findall(r"Recovered position:\s*([0-9a-f-]{36}:-?\d+)", text)
        if not found:
            raise AssertionError(f"--wsrep-recover found no position ({done.returncode}):\n{text}")
        return found[-1]


def _start_cluster() -> GaleraCluster:
    base = Path(tempfile.mkdtemp(prefix="persistence-galera-"))
    cluster = GaleraCluster(base)
    try:
        cluster.start()
    except BaseException:
        cluster.shutdown()
        logs = "\n".join(f"--- {n.name}\n{n.log_text()[-3000:]}" for n in cluster.nodes)
        shutil.rmtree(base, ignore_errors=True)
        raise AssertionError(f"the Galera cluster did not start:\n{logs}") from None
    return cluster


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """A running 3-node Galera cluster for the whole test session (skip without galera-4)."""
    missing = missing_software()
    if missing:
        reason = f"no Galera cluster: {missing} (apt-get install galera-4 mariadb-server rsync)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    cluster = _start_cluster()
    yield cluster
    cluster.shutdown()
    shutil.rmtree(cluster.base, ignore_errors=True)
