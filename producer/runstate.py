"""Run state the operator owns: where ``pixelrelay run`` keeps its signing key, the embedded
Redis's password and data, and ``run.json``, and the lock that lets one run at a time use them.

* The state folder is ``$XDG_STATE_HOME/pixelrelay/run-<hash>`` (default ``~/.local/state``),
  the hash of the output's identity (an S3 URI, or a local folder's resolved path): the same
  output finds the same state again, so a killed run resumes. Nothing is kept in the output
  tree, where whoever can write the output could plant a key.
* The folder is made 0700; one that is a symlink, owned by another user, or in a parent
  others may write (not sticky) is refused (``ConfigError``). Every file in it is opened
  without following a symlink (``O_NOFOLLOW``) and refused unless it is a regular file owned
  by the current user with mode 0600; files are made 0600, and the embedded Redis runs with
  umask 077.
* ``RunLock``: ``flock`` on ``run.lock``, held for the run's life and inherited by the embedded
  ``redis-server`` (so a Redis that outlived its run still holds it). A second run while the
  holder is alive is refused; when the holder is gone but its Redis is not, that Redis is
  stopped (SIGTERM) and the lock waited for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import signal
import stat
import time

from pixelrelay.pipeline.settings import ConfigError
from pixelrelay.pipeline.storage import is_s3

RUN_RECORD = "run.json"
KEY_FILE = "signing.key"
PASSWORD_FILE = "redis.password"
LOCK_FILE = "run.lock"
REDIS_PID_FILE = "redis.pid"
LOCK_WAIT_S = 15.0


def state_dir(output: str) -> str:
    """The run's state folder for ``output`` (see the module docstring)."""
    identity = output if is_s3(output) else os.path.realpath(output)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pixelrelay", "run-" + hashlib.sha256(identity.encode()).hexdigest()[:16])


def _check_parent(parent: str) -> None:
    """Others must not be able to swap the state folder: its parent is writable by the user
    alone, or sticky (like /tmp)."""
    st = os.stat(parent)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"run state: {parent} is writable by other users; use a folder of your own")


def own_folder(folder: str) -> str:
    """Make ``folder`` (0700, and its parent if missing) or check it is the user's own: not a
    symlink, owned by the user, in a parent others cannot write; its mode is narrowed to 0700."""
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.exists(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    _check_parent(parent)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"run state {folder}: not a folder (a symlink?); refusing to use it")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"run state {folder}: owned by uid {st.st_uid}, not by you; refusing to use it")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _check_own_file(path: str, fd: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"run state {path}: refusing it (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}; "
            "it must be a file of yours with mode 0600): remove it if it is not yours"
        )


def open_own(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor on ``path``, a file of the user's own (see the module docstring)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(f"run state {path}: a symlink; refusing to use it") from None
        raise exc
    try:
        _check_own_file(path, fd)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def secret_file(folder: str, name: str) -> str:
    """The path of secret ``name`` in ``folder``: made (0600, ``token_urlsafe(32)``) if there
    is none, else checked to be the user's own."""
    own_folder(folder)
    path = os.path.join(folder, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        os.close(open_own(path))
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path


def read_secret(path: str) -> str:
    with os.fdopen(open_own(path), encoding="utf-8") as f:
        return f.read().strip()


def recorded_job(folder: str, input_uri: str, output_uri: str) -> str | None:
    """The job id ``run.json`` records for this input and output (validated), if any."""
    try:
        with os.fdopen(open_own(os.path.join(folder, RUN_RECORD))) as f:
            row = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("input") != input_uri or row.get("output") != output_uri:
        return None
    job_id = row.get("job_id")
    return job_id if isinstance(job_id, str) and job_id else None


def record_job(folder: str, job_id: str, input_uri: str, output_uri: str) -> None:
    tmp = os.path.join(folder, RUN_RECORD + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"job_id": job_id, "input": input_uri, "output": output_uri}, f)
    os.replace(tmp, os.path.join(folder, RUN_RECORD))


def _pid_in(path: str) -> int | None:
    try:
        with os.fdopen(open_own(path)) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError, ConfigError):
        return None
    return pid if pid > 0 else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not). A reused pid reads as alive: the run
    is then refused, never another's Redis stopped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One run at a time on a state folder (see the module docstring); ``fd`` is passed to the
    embedded Redis."""

    def __init__(self, folder: str) -> None:
        self.folder = own_folder(folder)
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = -1

    def _try(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _stop_stale_redis(self) -> None:
        """The lock's holder is a Redis whose run is gone: stop it (SIGTERM, it saves first)."""
        pid = _pid_in(os.path.join(self.folder, REDIS_PID_FILE))
        if pid is not None and "redis-server" in _cmdline(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        _check_own_file(self.path, self.fd)
        deadline = time.monotonic() + wait_s
        while not self._try():
            holder = _pid_in(self.path)
            if holder is not None and holder != os.getpid() and _alive(holder):
                self.release()
                raise ConfigError(
                    f"another pixelrelay run (pid {holder}) is using this output (state in {self.folder}): "
                    "wait for it to end, or stop it"
                )
            if time.monotonic() > deadline:
                self.release()
                raise ConfigError(f"run state {self.folder}: locked by a process that does not let go of it")
            self._stop_stale_redis()
            time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
