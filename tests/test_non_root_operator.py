"""The operator as a non-root user: a tiny ``pixelrelay run`` as ``nobody`` (``runuser``, so
only where the tests run as root) finishes its job with the embedded Redis, and every file it
leaves is the operator's, none writable by others, its signing key 0600."""

from __future__ import annotations

import os
import pwd
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to switch to nobody"),
    pytest.mark.skipif(shutil.which("runuser") is None, reason="no runuser"),
]

SHIM = "from asyncio import timeout  # noqa: F401  (redis-py imports it below Python 3.11.3)\n"


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


def _as_nobody(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def _interpreter(home: Path) -> tuple[str, dict[str, str]]:
    """A Python that ``nobody`` can run with this checkout's packages: this one, or (when its
    folder is private, as under /root) the system's of the same minor version, given this
    environment's site-packages through a ``sitecustomize`` that workers inherit too."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PIXELRELAY_TORCH_THREADS": "1"}
    probe = ["-c", "import pixelrelay.producer.cli"]
    if _as_nobody([sys.executable, *probe], env, 60).returncode == 0:
        return sys.executable, env
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    if system is None:
        pytest.skip("this interpreter is not reachable by nobody and there is no system one of its version")
    boot = home / "boot"
    boot.mkdir()
    dirs = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (boot / "sitecustomize.py").write_text("import site\n" + "".join(f"site.addsitedir({d!r})\n" for d in dirs))
    (boot / "async_timeout.py").write_text(SHIM)
    env["PYTHONPATH"] = str(boot)
    if _as_nobody([system, *probe], env, 60).returncode != 0:
        pytest.skip("nobody cannot import this checkout (its folders are private)")
    return system, env


@pytest.fixture()
def home():
    """A folder of nobody's own, which nobody can reach (pytest's are under a 0700 folder)."""
    user = _user()
    folder = Path(tempfile.mkdtemp(prefix="pixelrelay-operator-"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_tiny_run_as_a_non_root_user_finishes_and_keeps_its_files_to_itself(home):
    user = _user()
    python, env = _interpreter(home)
    for path in home.rglob("*"):
        os.chown(path, user.pw_uid, user.pw_gid)
    inputs, out = home / "in", home / "out"
    assert _as_nobody([python, "-m", "pixelrelay", "demo", str(inputs), "--count", "2"], env, 60).returncode == 0

    done = _as_nobody(
        [
            python,
            "-m",
            "pixelrelay",
            "run",
            str(inputs),
            "--out",
            str(out),
            "--job-id",
            "as-nobody",
            "--chunk-size",
            "2",
        ],
        env,
        240,
    )

    assert done.returncode == 0, done.stderr
    assert "2 done, 0 failed" in done.stdout + done.stderr
    assert len(list(out.glob("*.png"))) == 2
    (state,) = (home / ".local" / "state" / "pixelrelay").glob("run-*")  # the operator's, not the output's
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and state.stat().st_uid == user.pw_uid
    assert stat.S_IMODE((state / "signing.key").stat().st_mode) == 0o600
    assert "port 0" in (state / "redis.conf").read_text().splitlines()  # a unix socket there, no TCP port
    for path in [out, *out.rglob("*")]:
        st = path.lstat()
        assert st.st_uid == user.pw_uid, f"{path} is not the operator's"
        assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), f"{path} is writable by others"
