"""A TCP proxy on 127.0.0.1 that can cut or stall the link to a server (a database, the service).

Modes:
- ``pass``: forward bytes both ways;
- ``cut``: close every open connection and refuse new ones (accept, then close);
- ``stall``: keep connections open but forward nothing (a database that hangs).

``connections`` counts the connections forwarded so far; ``retarget`` sends new
connections to another server (a restarted one on another port), as a load
balancer in front of a service would.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "cut", "stall")
        self.mode = mode
        if mode == "cut":
            self._close_all()

    def retarget(self, host: str, port: int) -> None:
        """Forward connections accepted from now on to ``host:port``."""
        self.target = (host, port)

    def close(self) -> None:
        self._running = False
        self._listener.close()
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept_loop(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while self._running:
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                if self.mode == "stall":
                    time.sleep(0.05)
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (client, upstream):
                with self._lock:
                    self._open.discard(sock)
                sock.close()
