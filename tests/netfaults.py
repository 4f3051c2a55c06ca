"""A TCP proxy on loopback that can be switched off: while down it resets every connection,
old and new, as a flaky network or a restarting S3 gateway would.

It reads the HTTP request line at the start of each read from a client ("PUT /bucket/key"),
so that a test can see which requests passed (``passed``) and which met the outage
(``met``: sent on a connection that was reset before any answer, or sent while down), and
can start the outage on a request rather than at a wall-clock time (``trip_on``: the
matching request is the first one reset)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


def request_line(data: bytes) -> str | None:
    """``"PUT /bucket/key"`` when ``data`` starts an HTTP request, else None."""
    if not data.startswith(METHODS):
        return None
    method, _, rest = data.partition(b" ")
    return f"{method.decode()} {rest.partition(b' ')[0].decode(errors='replace')}"


class FlakyProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.tripped = threading.Event()
        self.resets = 0
        self.passed: list[str] = []
        self.met: list[str] = []
        self.tripped_by: str | None = None  # the request that started the outage
        self.passed_at_trip = 0  # how many requests had passed by then
        self._trip: tuple[Callable[[str], bool], int] | None = None
        self._awaiting: dict[socket.socket, str] = {}  # client -> its request still without an answer
        self._conns: set[socket.socket] = set()
        self._lock = threading.RLock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trip_on(self, matches: Callable[[str], bool], count: int = 1) -> None:
        """Go down at the ``count``-th request whose line ``matches`` (counted from now):
        that request is not passed on but reset, and ``tripped`` is set."""
        with self._lock:
            self._trip = (matches, count)

    def _reset(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.shutdown(socket.SHUT_RD)  # wakes a thread blocked reading it
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _refuse(self, client: socket.socket) -> None:
        """Reset a connection made while down, noting the request it carried, if any came."""
        client.settimeout(2)
        try:
            line = request_line(client.recv(65536))
        except OSError:
            line = None
        with self._lock:
            if line:
                self.met.append(line)
        self._reset(client)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            # The check and the registration happen under the lock go_down takes, so no
            # connection accepted just before an outage slips through it (a pooled
            # keep-alive connection would otherwise carry requests all through the outage).
            with self._lock:
                if not self.up.is_set():
                    self.resets += 1
                    threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                    continue
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    self._reset(client)
                    continue
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, client), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, client), daemon=True).start()

    def _seen(self, client: socket.socket, line: str) -> None:
        """Note a request from ``client``; go down first if it is the one to trip on."""
        with self._lock:
            if self._trip and self.up.is_set() and self._trip[0](line):
                matches, left = self._trip
                self._trip = (matches, left - 1) if left > 1 else None
                if left == 1:
                    self.tripped_by, self.passed_at_trip = line, len(self.passed)
                    self.go_down()
                    self.tripped.set()
            if self.up.is_set():
                self.passed.append(line)
                self._awaiting[client] = line
            else:
                self.met.append(line)

    def _pipe(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src is client and (line := request_line(data)):
                    self._seen(client, line)
                elif src is not client:
                    with self._lock:
                        self._awaiting.pop(client, None)  # answered
                if not self.up.is_set():  # down: nothing more passes, in either direction
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def go_down(self) -> None:
        with self._lock:
            self.up.clear()
            self.met.extend(self._awaiting.values())  # cut before their answer
            self._awaiting.clear()
            for sock in self._conns:
                self._reset(sock)
            self._conns.clear()

    def come_up(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.listener.close()
