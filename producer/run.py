"""``pixelrelay run``: the whole system on one machine, through the production code path.

Starts an embedded Redis when none is configured, one worker process per stage (the same
``pixelrelay worker`` a cluster runs), submits the job, shows progress, waits, and shuts
everything down.

Invariants:

* ``run`` checks what it can before it starts anything (``preflight``): a local input exists,
  a local output is a folder it can make or write, the device is usable here (``--device
  cuda`` without a GPU: exit 2 at once). A run that ends before its job is submitted removes
  the folders it made (its state folder, the signing key): a refused run leaves nothing behind.
* The embedded Redis keeps an append-only file (``appendfsync everysec``) in the run's
  state folder, ``$XDG_STATE_HOME/pixelrelay/run-<hash of the output>/`` (default
  ``~/.local/state``; ``producer.runstate``: 0700, every file 0600 and the user's own, never
  in the output tree). ``run.json`` there records the job of the last run (``{job_id,
  input, output}``); a run of the same input and output, without ``--job-id``, resumes that
  job while it is not finished, instead of starting a new one (so a killed ``run`` just runs
  again). One run at a time holds the folder's lock (``RunLock``); a second is refused (exit 2).
* The embedded Redis is the run's alone: loopback only, a password (``redis.password`` in the
  state folder, in a config file, never argv), and no ``CONFIG``, ``DEBUG``, ``MODULE``,
  ``SAVE`` (``producer.embedded``). Its URL carries the password: it reaches the workers in
  their environment, and logs only redacted.
* Signing (``pipeline.signing``): with the embedded Redis, the run's key is
  ``signing.key`` in the state folder (``secrets.token_urlsafe(32)``, made with mode 0600 on
  first use, refused unless the user's own with mode 0600, reused by a run that resumes); the
  workers get its path as ``PIXELRELAY_SIGNING_KEY_FILE`` in their environment, never the key
  in argv, and any ``PIXELRELAY_SIGNING_KEY`` of the caller is not passed on. With an external
  Redis, the configured key is used; without one, ``run`` refuses (exit 2) unless
  ``--insecure-no-signing``, which its workers then get too.
* Threads (``workers.balance``): unless ``PIXELRELAY_TORCH_THREADS`` is set, the workers start
  with a prior split of the machine's cores (decode most) and ``run`` re-splits them by each
  stage's measured CPU cost per item while the job runs.
* The embedded Redis and the workers end with ``run`` (``producer.orphans``): killed by
  SIGKILL or the OOM killer, ``run`` takes its workers (SIGKILL) and Redis (SIGTERM) with it.
  SIGTERM and SIGHUP end the run like Ctrl-C: workers are stopped (warm shutdown), then
  Redis, and the exit code is 130.
* A worker that exits while the job runs (SIGKILL, OOM, the watchdog's exit 75) is started
  again, and its chunk comes back through its lease and the sweep; ``run`` gives up (exit 5,
  logs kept) only when a worker exits ``MAX_DEATHS`` times within ``DEATHS_WINDOW_S``, or
  exits with the usage code 2 (it cannot start: a missing model, a bad device).
* The workers, and the submission, allow the backend specs ``run`` was given
  (``own_allowlist``, put in ``PIXELRELAY_ALLOWED_BACKENDS``): a local model folder named
  on ``run``'s command line is the user's own.
* The wait loop keeps the job alive (``producer.keeper``): it restarts a dead embedded
  Redis on its folder, rebuilds the job if Redis lost it, and sweeps for lost chains.

The workers log to ``<tmp>/pixelrelay-workers-XXXX/{encode,plan,decode}.log``; the folder is
printed (stderr) when the workers start. It is deleted after a run that ends with every item
done and no worker started again, unless ``--keep-logs``, and kept, and printed again, after
anything else (a worker exited, items failed, an error, Ctrl-C).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import manifest_uri
from pixelrelay.jobs.recover import RebuildError
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import Backends, JobOptions
from pixelrelay.pipeline.settings import ConfigError, Settings, read_key_file
from pixelrelay.pipeline.storage import is_s3, open_storage
from pixelrelay.producer.embedded import EmbeddedRedis
from pixelrelay.producer.keeper import Keeper
from pixelrelay.producer.listing import InputError
from pixelrelay.producer.orphans import bound_to_parent
from pixelrelay.producer.runstate import (
    KEY_FILE,
    PASSWORD_FILE,
    RunLock,
    read_secret,
    record_job,
    recorded_job,
    secret_file,
    state_dir,
)
from pixelrelay.producer.status import WaitAborted, is_finished, summarize, wait_for_job
from pixelrelay.producer.submit import check_instruction, normalize_location, redis_client, submit
from pixelrelay.workers import balance
from pixelrelay.workers.balance import Balancer

MAX_DEATHS = 3  # a worker exiting this often within DEATHS_WINDOW_S cannot run: give up
DEATHS_WINDOW_S = 60.0


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: end the run as Ctrl-C does."""


class LocalWorkers:
    def __init__(
        self, env: dict[str, str], worker_args: dict[str, list[str]], stage_env: dict[str, dict[str, str]] | None = None
    ) -> None:
        self.env = env
        self.worker_args = worker_args
        self.stage_env = stage_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.deaths: dict[str, list[float]] = {}
        self.restarts = 0  # workers started again after exiting: their logs are kept
        self.logdir = tempfile.mkdtemp(prefix="pixelrelay-workers-")

    def start(self) -> None:
        for stage in C.STAGES:
            self._start(stage)

    def _start(self, stage: str) -> None:
        # -P: the current folder is not put on sys.path, so a stray argparse.py (or any module
        # named like one we import) where `run` was started never runs inside the workers.
        cmd = [sys.executable, "-P", "-m", "pixelrelay", "worker", "--stage", stage, *self.worker_args.get(stage, [])]
        with open(os.path.join(self.logdir, f"{stage}.log"), "ab") as log:
            env = {**self.env, **self.stage_env.get(stage, {})}
            # SIGKILL when `run` dies: its chunk comes back through its lease, as after any kill.
            self.procs[stage] = subprocess.Popen(
                bound_to_parent(cmd, signal.SIGKILL), env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def _tail(self, stage: str) -> str:
        with open(os.path.join(self.logdir, f"{stage}.log"), "rb") as log:
            return log.read()[-2000:].decode(errors="replace")

    def problem(self) -> str | None:
        """Restart any worker that exited; a reason to give up when one cannot run."""
        for stage, proc in self.procs.items():
            if proc.poll() is None:
                continue
            now = time.monotonic()
            deaths = [t for t in self.deaths.get(stage, []) if now - t < DEATHS_WINDOW_S] + [now]
            self.deaths[stage] = deaths
            if proc.returncode == ExitCode.USAGE or len(deaths) >= MAX_DEATHS:
                return f"the {stage} worker exited with code {proc.returncode}:\n{self._tail(stage)}"
            print(
                f"pixelrelay run: the {stage} worker exited with code {proc.returncode}; starting it again",
                file=sys.stderr,
                flush=True,
            )
            self.restarts += 1
            self._start(stage)
        return None

    def finish_logs(self, ok: bool, keep: bool) -> None:
        """Delete the log folder after a clean run with no worker restarted (unless ``keep``);
        else say where it is."""
        if ok and not keep and not self.restarts:
            shutil.rmtree(self.logdir, ignore_errors=True)
        else:
            print(f"worker logs kept in {self.logdir}", file=sys.stderr, flush=True)

    def stop(self, timeout_s: float = 30.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        for proc in self.procs.values():
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_key_file(folder: str) -> str:
    """The path of the run's signing key in ``folder`` (``producer.runstate.secret_file``)."""
    return secret_file(folder, KEY_FILE)


def _unfinished(settings: Settings, job_id: str, output: str) -> bool:
    """Whether job ``job_id`` is worth resuming: Redis knows it unfinished, or Redis lost it
    and its manifest is not written."""
    state = JobState(redis_client(settings), job_id, settings.signer())
    if state.exists():
        return not is_finished(state.info())
    return not open_storage(output, settings.s3_endpoint_url).exists(manifest_uri(output, job_id))


def own_allowlist(settings: Settings, backends: Backends, worker_args: Mapping[str, Sequence[str]]) -> str:
    """``PIXELRELAY_ALLOWED_BACKENDS`` for this run: what is allowed already, plus every spec
    ``run`` starts its own workers with or submits its job with (they are the user's own)."""
    specs = [settings.allowed_backends] if settings.allowed_backends else []
    specs += [getattr(settings, name) for name in ("encoder", "planner", "decoder")]
    specs += [spec for spec in (backends.encoder, backends.planner, backends.decoder) if spec]
    for args in worker_args.values():
        specs += [
            value
            for flag, value in zip(args, args[1:], strict=False)
            if flag in ("--encoder", "--planner", "--decoder")
        ]
    return " ".join(dict.fromkeys(spec.strip() for spec in specs if spec.strip()))


def _balance(env: dict[str, str], workers: LocalWorkers) -> Balancer | None:
    """Share the cores between the three workers by their measured cost (``workers.balance``),
    starting from a prior split; a ``PIXELRELAY_TORCH_THREADS`` the user set is kept as is."""
    if env.get("PIXELRELAY_TORCH_THREADS"):
        return None
    balancer = Balancer(workers.logdir, os.cpu_count() or 1)
    env[balance.ENV_DIR] = workers.logdir
    workers.stage_env = {stage: {"PIXELRELAY_TORCH_THREADS": str(n)} for stage, n in balancer.current.items()}
    return balancer


def _shares(shares: dict[str, int]) -> str:
    return ", ".join(f"{stage} {shares[stage]}" for stage in C.STAGES)


def _on_signal(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


@dataclass(frozen=True)
class RunOptions:
    """What one ``pixelrelay run`` does, beside its settings.

    Attributes:
        input: The input: a local folder or manifest file, or ``s3://bucket/prefix``.
        output: The output folder or ``s3://bucket/prefix``.
        options: The job's options (task, output size, format).
        backends: Backends the job itself asks for (default: the workers' own).
        job_id: The job's id; None resumes the job the state folder records for this input
            and output while it is unfinished, else starts a new one.
        worker_args: ``pixelrelay worker`` flags per stage (``--device``, ``--decoder``, ...).
        keep_logs: Keep the workers' log folder after a run with every item done.
        follow_symlinks: Follow symlinked files and folders in a folder input.
        incremental: Send only inputs new or changed since the last jobs into the output.
        on_end: Called as ``on_end(settings, job_id, output, exit_code)`` when waiting ends,
            while the embedded Redis still runs (``--report``, ``--notify``).
    """

    input: str
    output: str
    options: JobOptions
    backends: Backends = field(default_factory=Backends)
    job_id: str | None = None
    worker_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    keep_logs: bool = False
    follow_symlinks: bool = False
    incremental: bool = False
    on_end: Callable[[Settings, str, str, int], None] | None = None


# --- checks before anything starts ---------------------------------------------------------


# Device files of a GPU that torch can reach as "cuda" (NVIDIA, ROCm, WSL 2); on Linux,
# none of them means no GPU, known without importing torch.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def _no_gpu_device_files() -> bool:
    return sys.platform == "linux" and not any(os.path.exists(path) for path in GPU_DEVICE_FILES)


def check_device(device: str) -> None:
    """ConfigError unless ``device`` (cpu, cuda, cuda:N, mps) is usable here. torch is
    imported only for a device other than cpu, and not at all on a Linux host with no GPU
    device files."""
    if device == "cpu":
        return
    if device.startswith("cuda") and _no_gpu_device_files():
        raise ConfigError(
            f"--device {device}: no GPU on this machine (no {', '.join(GPU_DEVICE_FILES)}); use --device cpu"
        )
    try:
        import torch
    except ImportError:
        raise ConfigError(f"--device {device}: torch is not installed") from None
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: no MPS device here; use --device cpu")
        return
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA GPU (torch.cuda.is_available() is False)"
        raise ConfigError(f"--device {device}: torch sees {seen} here; use --device cpu")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_locations(input_uri: str, output_uri: str) -> None:
    """InputError for a local input that does not exist; ConfigError for a local output that
    is not a folder or cannot be made (S3 locations are checked when they are read)."""
    if not is_s3(input_uri) and not os.path.exists(input_uri):
        raise InputError(f"input {input_uri}: no such folder or manifest file")
    if is_s3(output_uri):
        return
    if os.path.exists(output_uri) and not os.path.isdir(output_uri):
        raise ConfigError(f"--out {output_uri}: not a folder")
    parent = _nearest_existing(output_uri)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {output_uri}: cannot create or write it (in {parent})")


def preflight(settings: Settings, run: RunOptions) -> None:
    """Everything ``run`` can check before it starts Redis or a worker."""
    check_locations(run.input, run.output)
    check_instruction(run.options, run.backends.planner or settings.planner)
    check_device(settings.device)


# --- the run --------------------------------------------------------------------------------


class _Created:
    """The run's state folder, removed again when the run made it and ended before its job was
    submitted (a refused run leaves nothing behind). Its parents are shared by other runs:
    they stay."""

    def __init__(self, folder: str) -> None:
        self.top = None if os.path.lexists(folder) else folder  # None: it was there
        self.submitted = False

    def undo(self) -> None:
        if self.top is not None and not self.submitted:
            shutil.rmtree(self.top, ignore_errors=True)


def _trap_signals(stack: ExitStack) -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        stack.callback(signal.signal, signum, signal.signal(signum, _on_signal))


def _embedded(stack: ExitStack, settings: Settings, env: dict[str, str], folder: str) -> tuple[Settings, EmbeddedRedis]:
    """Start the embedded Redis on ``folder`` with the run's key; the settings that reach it."""
    lock = stack.enter_context(RunLock(folder))
    key_path = run_key_file(folder)
    env.pop("PIXELRELAY_SIGNING_KEY", None)
    env["PIXELRELAY_SIGNING_KEY_FILE"] = key_path
    password = read_secret(secret_file(folder, PASSWORD_FILE))
    server = EmbeddedRedis(
        data_dir=folder, own_session=False, password=password, locked=True, keep_fds=[lock.fd], unix_socket=True
    )
    stack.enter_context(server)
    env["PIXELRELAY_REDIS_URL"] = server.url
    secret = type(settings.redis_url)
    settings = settings.model_copy(
        update={
            "redis_url": secret(server.url),
            "signing_key_file": key_path,
            "signing_key": secret(read_key_file(key_path)),
        }
    )
    return settings, server


def _resumable(settings: Settings, folder: str, run: RunOptions) -> str | None:
    """The job ``run.json`` records for this input and output, while it is unfinished."""
    recorded = recorded_job(folder, run.input, run.output)
    if run.job_id is None and recorded and _unfinished(settings, recorded, run.output):
        print(f"pixelrelay run: resuming job {recorded} (state in {folder})", file=sys.stderr, flush=True)
        return recorded
    return run.job_id


def _wait(
    settings: Settings, job_id: str, output: str, server: EmbeddedRedis | None, workers: LocalWorkers, balancer
) -> int:
    """Wait for the job, keeping Redis, the workers and the thread split healthy; its exit code."""
    client = redis_client(settings)
    state = JobState(client, job_id, settings.signer())

    def health() -> str | None:
        if server is not None and not server.alive():
            print("pixelrelay run: the embedded Redis exited; starting it again", file=sys.stderr, flush=True)
            server.start()
        if balancer is not None and (shares := balancer.tick()):
            print(f"pixelrelay run: torch threads by measured cost: {_shares(shares)}", file=sys.stderr, flush=True)
        return workers.problem()

    try:
        wait_for_job(state, settings, sys.stderr, health=health, keeper=Keeper(client, settings, job_id, output))
    except WaitAborted as exc:  # a worker cannot run; the message has its log tail
        print(f"pixelrelay run: {exc}", file=sys.stderr, flush=True)
        return ExitCode.WORKER_EXITED
    except RebuildError as exc:
        print(f"pixelrelay run: Redis lost the job and it cannot be rebuilt: {exc}", file=sys.stderr, flush=True)
        return ExitCode.USAGE
    return summarize(state, settings, sys.stderr)


def run_local(settings: Settings, run: RunOptions) -> int:
    """Run one job on this machine (see the module docstring); its exit code. ConfigError or
    InputError (exit 2) before anything starts when the input, output or device is wrong."""
    run = replace(run, input=normalize_location(run.input), output=normalize_location(run.output))
    preflight(settings, run)
    outcome: list[int] = []
    with ExitStack() as stack:
        _trap_signals(stack)
        env = dict(os.environ)
        server: EmbeddedRedis | None = None
        job_id = run.job_id
        folder = state_dir(run.output)
        created = _Created(folder)
        stack.callback(created.undo)  # runs last: after Redis and the workers stopped
        if not settings.redis:
            settings, server = _embedded(stack, settings, env, folder)
            job_id = _resumable(settings, folder, run)
        elif not settings.signer().secure:  # no key: ConfigError (exit 2) unless --insecure-no-signing
            env["PIXELRELAY_INSECURE_NO_SIGNING"] = "1"
        allowed = own_allowlist(settings, run.backends, run.worker_args)
        env["PIXELRELAY_ALLOWED_BACKENDS"] = allowed
        settings = settings.model_copy(update={"allowed_backends": allowed})
        workers = LocalWorkers(env, {stage: list(args) for stage, args in run.worker_args.items()})
        balancer = _balance(env, workers)
        # Runs after the workers stop (callbacks unwind last-in first-out), whatever happened.
        # A run refused before its job was submitted has no logs worth keeping.
        stack.callback(lambda: workers.finish_logs(outcome == [ExitCode.OK] or not created.submitted, run.keep_logs))
        stack.callback(workers.stop)
        print(f"worker logs: {workers.logdir}", file=sys.stderr, flush=True)
        workers.start()
        submission = submit(
            settings,
            run.input,
            run.output,
            run.options,
            run.backends,
            job_id,
            follow_symlinks=run.follow_symlinks,
            incremental=run.incremental,
        )
        created.submitted = True
        if submission.incremental:
            print(submission.incremental, file=sys.stderr, flush=True)
        if submission.nothing_new:  # --incremental: no job to run
            outcome.append(ExitCode.OK)
            return ExitCode.OK
        if server is not None:
            record_job(folder, submission.job_id, run.input, run.output)
        print(submission.job_id, flush=True)
        outcome.append(_wait(settings, submission.job_id, submission.output, server, workers, balancer))
        if run.on_end is not None:  # --report / --notify, while the embedded Redis still runs
            run.on_end(settings, submission.job_id, submission.output, outcome[0])
    return outcome[0]
