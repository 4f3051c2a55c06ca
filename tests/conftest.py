"""Session fixtures with real parts: a Redis server, an S3 server (moto, over HTTP) and
real Celery stage workers as subprocesses.

Every test process and worker subprocess shares one signing key (``TEST_SIGNING_KEY``, put
in the environment at import: ``pipeline.signing``); ``TEST_SIGNER`` signs with it.

Markers: ``e2e`` marks a test that starts ``pixelrelay`` processes (stage workers, the CLI,
``pixelrelay run``); a test asking for a fixture in ``E2E_FIXTURES`` is marked on collection.
A test without the mark that starts such a process fails with ``SpawnOutsideE2E``, so
``-m "not e2e"`` never runs one unnoticed. ``slow`` marks the long tests of either kind."""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import boto3
import pytest
import redis

from pixelrelay.pipeline.signing import Signer
from pixelrelay.producer.embedded import EmbeddedRedis, free_port

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log

REPO = Path(__file__).resolve().parents[1]
TEST_SIGNING_KEY = "pixelrelay-tests-only-signing-key"
os.environ["PIXELRELAY_SIGNING_KEY"] = TEST_SIGNING_KEY
os.environ.pop("PIXELRELAY_SIGNING_KEY_FILE", None)
os.environ.pop("PIXELRELAY_INSECURE_NO_SIGNING", None)
# `pixelrelay run` keeps its state under $XDG_STATE_HOME: the tests' own, never the user's.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="pixelrelay-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)
TEST_SIGNER = Signer(TEST_SIGNING_KEY)
TEST_BACKENDS = {"encoder": "analysis", "planner": "rules", "decoder": "classic"}
E2E_FIXTURES = frozenset({"stage_workers"})


class SpawnOutsideE2E(RuntimeError):
    """A test not marked ``e2e`` started a ``pixelrelay`` process."""


def _runs_pixelrelay(args: str | os.PathLike | Sequence[str | os.PathLike]) -> bool:
    """Whether a command line runs the ``pixelrelay`` CLI (``-m pixelrelay``, the console
    script, or ``-c`` code calling a CLI's ``main``) or a benchmark script (each starts its
    own workers)."""
    if isinstance(args, str | os.PathLike):
        args = shlex.split(os.fspath(args))
    argv = [os.fspath(a) for a in args]
    if argv and Path(argv[0]).name == "pixelrelay":
        return True
    if len(argv) > 1 and Path(argv[1]).resolve().is_relative_to(REPO / "benchmarks"):
        return True
    flag, value = _interpreter_target(argv)
    return (flag == "-m" and value.split(".")[0] == "pixelrelay") or (
        flag == "-c" and "main(" in value and ("pixelrelay" in value or "cli import" in value)
    )


def _interpreter_target(argv: list[str]) -> tuple[str, str]:
    """The interpreter's own ``-m MODULE`` or ``-c CODE`` (not an option of the program it runs)."""
    for i, arg in enumerate(argv[1:-1], start=1):
        if not arg.startswith("-"):
            break
        if arg in ("-m", "-c"):
            return arg, argv[i + 1]
    return "", ""


class _SpawnGuard:
    """Wraps ``subprocess.Popen`` so that only ``e2e`` tests start ``pixelrelay`` processes."""

    allowed = True
    real_init = subprocess.Popen.__init__

    @classmethod
    def install(cls) -> None:
        def init(popen: subprocess.Popen, args, *rest, **kwargs) -> None:
            if not cls.allowed and _runs_pixelrelay(args):
                raise SpawnOutsideE2E(f"mark this test e2e: it starts {args!r}")
            cls.real_init(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = init


_SpawnGuard.install()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _SpawnGuard.allowed = item.get_closest_marker("e2e") is not None
    yield
    _SpawnGuard.allowed = True


@pytest.fixture(scope="session")
def redis_url():
    """``REDIS_URL`` when set, else a fresh redis-server on a free port for this session."""
    url = os.environ.get("REDIS_URL")
    if url:
        redis.Redis.from_url(url).ping()
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PIXELRELAY_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    name = "pr-" + uuid.uuid4().hex[:12]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server)


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PIXELRELAY_REDIS_URL=redis_url,
        PIXELRELAY_TORCH_THREADS="1",
        PIXELRELAY_BATCH_SIZE="4",
        PIXELRELAY_CHUNK_SIZE="4",
        PIXELRELAY_WINDOW="4",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


class WorkerPool:
    """The three stage workers, as real ``pixelrelay worker`` subprocesses."""

    def __init__(self, env: dict[str, str], logdir: Path, backends: dict[str, str]) -> None:
        self.env, self.logdir, self.backends = env, logdir, backends
        self.procs: list[subprocess.Popen] = []

    def start(self, decode_args: list[str] = ()) -> WorkerPool:
        flags = {
            "encode": ["--encoder", self.backends["encoder"]],
            "plan": ["--planner", self.backends["planner"]],
            "decode": ["--decoder", self.backends["decoder"], *decode_args],
        }
        for stage, extra in flags.items():
            log = open(self.logdir / f"{stage}.log", "wb")
            cmd = [
                sys.executable,
                "-m",
                "pixelrelay",
                "worker",
                "--stage",
                stage,
                "--loglevel",
                os.environ.get("PIXELRELAY_TEST_WORKER_LOGLEVEL", "WARNING"),
                *extra,
            ]
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        return self

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def logs(self, tail: int | None = 3000) -> str:
        """Each worker's log, its last ``tail`` characters (for a failure message), or whole
        (``tail=None``: to look for a line, which later lines may have pushed out of a tail)."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0 :]}"
            for p in sorted(self.logdir.glob("*.log"))
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def stage_workers(redis_url, s3_server, tmp_path_factory):
    env = worker_env(redis_url, PIXELRELAY_MAX_IMAGE_PIXELS="4000000")
    pool = WorkerPool(env, tmp_path_factory.mktemp("worker-logs"), TEST_BACKENDS).start()
    yield pool
    pool.stop()


def run_cli(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixelrelay", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
