"""A TCP proxy on loopback that can be switched off: while down it resets every connection,
old and new, as a flaky network or a restarting S3 gateway would."""

from __future__ import annotations

import socket
import struct
import threading


class FlakyProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.resets = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _reset(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            sock.close()
        except OSError:
            pass

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
                    self._reset(client)
                    continue
                try:
                    upstream = socket.create_connection(self.target)
                except OSError:
                    self._reset(client)
                    continue
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
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
            for sock in self._conns:
                self._reset(sock)
            self._conns.clear()

    def come_up(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.listener.close()
