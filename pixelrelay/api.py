"""The Python API, for orchestrators (Airflow, Dagster, Prefect) and notebooks.

    import pixelrelay

    job = pixelrelay.submit("s3://in/photos", "s3://out/restored", task="upscale", scale=2)
    status = job.wait(timeout=3600)          # JobStatusInfo; TimeoutError subclass on timeout
    for row in job.manifest():               # ManifestRow per item, streamed from storage
        ...
    sys.exit(status.exit_code)               # 0 all done, 1 some failed, 4 cancelled

Invariants:

* Nothing here is new logic: ``submit`` is ``producer.submit.submit`` (what ``pixelrelay
  submit`` runs), ``Job.wait`` is ``producer.status.wait_for_job`` with the same ``Keeper``
  (Redis lost the job: rebuilt from storage; lost chains: swept), ``Job.status`` is
  ``producer.status.job_info`` (what ``status --json`` prints), ``Job.cancel`` is
  ``producer.control.cancel_job`` (what ``pixelrelay cancel`` runs), and
  ``JobStatusInfo.exit_code`` is ``producer.status.exit_code_for`` (what ``status`` exits
  with). The CLI and the API cannot disagree.
* Quiet: nothing is printed unless ``wait(progress=stream)`` asks for it.
* Typed errors propagate unchanged: ``ConfigError`` (a bad setting or argument, naming it;
  ``UnknownJobError`` and ``JobFinishedError`` are ones too), ``InputError`` (the input lists
  nothing), ``StorageError``, ``RebuildError``; ``WaitTimeout`` (a ``TimeoutError``) when
  ``wait`` gives up, the job going on; ``ManifestNotReady`` before the manifest is written.
* Every ``JobState`` of this module is built by ``_state`` (one place to adapt).
* ``import pixelrelay`` stays cheap: the package root exports these names lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from pydantic import ValidationError

from pixelrelay.exitcodes import ExitCode
from pixelrelay.jobs.files import manifest_uri
from pixelrelay.jobs.recover import RebuildError
from pixelrelay.jobs.state import JobState, JobStatus, is_finished
from pixelrelay.pipeline.messages import DEFAULT_QUALITY, Backends, ItemRecord, JobOptions
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.storage import StorageError, open_storage
from pixelrelay.producer.control import DEFAULT_GRACE_S, CancelOutcome, JobFinishedError, UnknownJobError, cancel_job
from pixelrelay.producer.keeper import Keeper
from pixelrelay.producer.listing import InputError
from pixelrelay.producer.status import JobStatusInfo, WaitTimeout, job_info, wait_for_job
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
    "submit",
]


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
        return Settings.from_env(**overrides)
    if not overrides:
        return settings
    return Settings.from_env(**{**{name: getattr(settings, name) for name in Settings.model_fields}, **overrides})


def _state(settings: Settings, job_id: str) -> JobState:
    """The one place this module builds a JobState."""
    return JobState(redis_client(settings), job_id, settings.signer())


@dataclass
class Job:
    """A handle on a submitted job (``submit``) or an existing one (``Job.attach``): its id,
    its output and the settings that reach its Redis. It holds no connection."""

    job_id: str
    output: str  # normalised (an absolute path, or s3://bucket/prefix without a trailing /)
    settings: Settings = field(repr=False)
    submission: Submission | None = field(default=None, repr=False, compare=False)  # set by submit()

    @classmethod
    def attach(
        cls, job_id: str, out: str | None = None, settings: Settings | None = None, **setting_overrides: Any
    ) -> Job:
        """A handle on an existing job. ``out`` (its output) lets ``status``/``wait`` rebuild
        it from storage where Redis lost it; without it, Redis must know the job
        (``UnknownJobError`` otherwise)."""
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
        """The job's status now (what ``pixelrelay status JOB --json`` prints)."""
        state = self._known()
        return job_info(self.job_id, state.info(), state.counts(), self.settings)

    def wait(self, timeout: float | None = None, poll_s: float = 0.5, progress: TextIO | None = None) -> JobStatusInfo:
        """Block until the job ended (finished, some items failed, or cancelled: its manifest
        is written) and return its status. ``timeout`` (seconds): ``WaitTimeout`` (a
        ``TimeoutError``) after that long; the job goes on. ``progress``: a stream to show
        progress on, as the CLI does (default: none)."""
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
        return manifest_uri(self.output, self.job_id)

    def manifest(self) -> Iterator[ManifestRow]:
        """The job's manifest, one validated ``ManifestRow`` per item in index order, read
        from storage line by line. ``ManifestNotReady`` (raised here, not on first use)
        while the job has not ended; ``ManifestError`` for a line that is not a row."""
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
        """Cancel the job as ``pixelrelay cancel`` does: no new chains; the ones in flight end
        (up to ``grace_s`` seconds); the manifest is written before this returns.
        ``JobFinishedError`` if it had ended already (not cancelled)."""
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
    settings: Settings | None = None,
    **setting_overrides: Any,
) -> Job:
    """Submit (or, with an existing ``job_id``, resume) a job, as ``pixelrelay submit`` does,
    and return its handle without waiting. ``input``: a local folder, ``s3://bucket/prefix``
    or a manifest file; ``out``: a folder or ``s3://`` prefix. Settings come from the
    environment (``PIXELRELAY_*``), then ``settings``, then ``setting_overrides`` (``Settings``
    field names: ``redis_url=``, ``chunk_size=``, ``window=``, ...). The output size:
    ``scale`` any factor in (0, 8] (e.g. 1.5, 3, 0.5), or ``width`` and/or ``height`` to fit
    inside keeping the aspect ratio (not with ``scale``); a bad one is a ConfigError."""
    settings = _settings(settings, setting_overrides)
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
    submission = _submit(settings, input, out, options, backends, job_id)
    return Job(job_id=submission.job_id, output=submission.output, settings=settings, submission=submission)
