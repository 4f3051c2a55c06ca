"""``pixelrelay run``: the whole system on one machine, through the production code path.

Starts an embedded Redis when none is configured, one worker process per stage (the same
``pixelrelay worker`` a cluster runs), submits the job, shows progress, waits, and shuts
everything down.

The workers log to ``<tmp>/pixelrelay-workers-XXXX/{encode,plan,decode}.log``; the folder is
printed (stderr) when the workers start. It is deleted after a run that ends with every item
done, unless ``--keep-logs``, and kept, and printed again, after anything else (items failed,
a worker died, an error, Ctrl-C).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import Backends, JobOptions
from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer.embedded import EmbeddedRedis
from pixelrelay.producer.status import WaitAborted, summarize, wait_for_job
from pixelrelay.producer.submit import redis_client, submit
from pixelrelay.jobs.state import JobState


class LocalWorkers:
    def __init__(self, env: dict[str, str], worker_args: dict[str, list[str]]) -> None:
        self.env = env
        self.worker_args = worker_args
        self.procs: dict[str, subprocess.Popen] = {}
        self.logdir = tempfile.mkdtemp(prefix="pixelrelay-workers-")

    def start(self) -> None:
        for stage in C.STAGES:
            cmd = [sys.executable, "-m", "pixelrelay", "worker", "--stage", stage, *self.worker_args.get(stage, [])]
            with open(os.path.join(self.logdir, f"{stage}.log"), "wb") as log:
                self.procs[stage] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def problem(self) -> str | None:
        for stage, proc in self.procs.items():
            if proc.poll() is not None:
                with open(os.path.join(self.logdir, f"{stage}.log"), "rb") as log:
                    tail = log.read()[-2000:].decode(errors="replace")
                return f"the {stage} worker exited with code {proc.returncode}:\n{tail}"
        return None

    def finish_logs(self, ok: bool, keep: bool) -> None:
        """Delete the log folder after a clean run (unless ``keep``); else say where it is."""
        if ok and not keep:
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


def run_local(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    options: JobOptions,
    backends: Backends,
    job_id: str | None,
    worker_args: dict[str, list[str]],
    keep_logs: bool = False,
) -> int:
    outcome: int | None = None
    with ExitStack() as stack:
        env = dict(os.environ)
        if not settings.redis:
            server = stack.enter_context(EmbeddedRedis())
            env["PIXELRELAY_REDIS_URL"] = server.url
            settings = settings.model_copy(update={"redis_url": type(settings.redis_url)(server.url)})
        # Share the cores between the three local workers unless told otherwise.
        env.setdefault("PIXELRELAY_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
        workers = LocalWorkers(env, worker_args)
        # Runs after the workers stop (callbacks unwind last-in first-out), whatever happened.
        stack.callback(lambda: workers.finish_logs(outcome == ExitCode.OK, keep_logs))
        stack.callback(workers.stop)
        print(f"worker logs: {workers.logdir}", file=sys.stderr, flush=True)
        workers.start()
        submission = submit(settings, input_uri, output_uri, options, backends, job_id)
        print(submission.job_id, flush=True)
        state = JobState(redis_client(settings), submission.job_id)
        try:
            wait_for_job(state, settings, sys.stderr, health=workers.problem)
        except WaitAborted as exc:  # a worker exited; the message has its log tail
            print(f"pixelrelay run: {exc}", file=sys.stderr, flush=True)
            outcome = ExitCode.WORKER_EXITED
        else:
            outcome = summarize(state, settings, sys.stderr)
    return outcome
