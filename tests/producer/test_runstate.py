"""Run state the operator owns (``producer.runstate``): one run per state folder, even when
the Redis of a run that was killed is still there; a folder others could swap is refused."""

from __future__ import annotations

import os
import time

import pytest
import redis

from pixelrelay.pipeline.settings import ConfigError
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
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, password="p" * 32, socket_timeout=1).ping()
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
