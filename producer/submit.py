"""Submit (or resume) a job: list the input, store the listing, send the first window.

Re-submitting a job id resumes it: done items are skipped and failed ones are tried again.
If Redis lost the job, its state is rebuilt from the manifest parts in storage
(``jobs.recover``). With ``PIXELRELAY_STATE_URI`` set, the job is registered there
(``jobs.registry``) once it is fed, so that the workers' sweep can rebuild it too.

A new job into an output that already holds results reuses each one whose fingerprint
answers the same request with the same models (``pipeline.fingerprint``), and re-processes
the rest; ``JobOptions.overwrite`` re-processes everything. Backend specs are normalised
here (``KIND[:MODEL]``) so that equal requests fingerprint equally; a stage the job leaves
unset runs the stage worker's own default, which the fingerprint's model part records.

The listing (``producer.listing``) streams into the listing shards with bounded memory;
sources it rejects (a path escaping ``--out``, a colliding output, a symlink not followed)
are items that fail with their reason. ``follow_symlinks`` (``--follow-symlinks``) is part of
the job's spec: without it the workers read a folder input's files following no symlink
(``workers.guard.InputRoot``), so a link swapped in after the listing fails its item.

``incremental`` (``--incremental``) leaves out of a new job's listing every input that is
done and unchanged since the last jobs into this output (``producer.incremental``); when
nothing is left, no job is created (``Submission.job_id`` is "", ``nothing_new`` is set).
It does not apply to a job id that is resumed, and is refused with ``overwrite``.

An edit or style job whose planner is ``rules`` (named, or the submitter's default) is
refused (exit 2) when the rules planner cannot map its instruction
(``planners.edits.map_instruction``, which needs no torch): refused now rather than failing
every item later. Other planners (``hf-llm``) are left to map it themselves.

A spec that names a local path is refused (exit 2) unless the submitter's own
``PIXELRELAY_ALLOWED_BACKENDS`` allows it: the workers refuse what their list does not allow.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from pixelrelay.jobs.files import Listing, spec_uri, write_listing, write_spec
from pixelrelay.jobs.recover import load_spec, restore_done, start
from pixelrelay.jobs.registry import open_registry
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.limits import check_chunk
from pixelrelay.pipeline.messages import EDIT_TASKS, JOB_ID_PATTERN, Backends, JobOptions, JobSpec
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.base import StageSpec
from pixelrelay.pipeline.stages.registry import names_local_path, parse_allowlist, spec_allowed, validate_spec
from pixelrelay.pipeline.storage import Storage, is_s3, open_storage
from pixelrelay.producer.incremental import Incremental
from pixelrelay.producer.listing import list_items, list_versioned_items
from pixelrelay.workers.celery_app import create_app
from pixelrelay.workers.flow import job_budget, sender

if TYPE_CHECKING:
    from celery import Celery

    from pixelrelay.pipeline.signing import Signer

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


@dataclass
class Submission:
    job_id: str
    seq: int
    total: int
    resumed: bool
    already_done: int
    output: str = ""  # the job's output, normalised
    incremental: str = ""  # --incremental: the line that says what was sent and skipped
    nothing_new: bool = False  # --incremental found nothing to send: no job was created


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A new job as asked for, its locations and backend specs normalised.

    Attributes:
        job_id: the job's id (checked against ``JOB_ID_PATTERN``).
        input_uri, output_uri: the input and output, normalised (``normalize_location``).
        options: the job's options.
        backends: the job's backend specs (``normalize_backends``).
        follow_symlinks: whether the listing and the workers' reads follow symlinks.
    """

    job_id: str
    input_uri: str
    output_uri: str
    options: JobOptions
    backends: Backends
    follow_symlinks: bool = False

    def spec(self, listing: Listing, settings: Settings) -> JobSpec:
        """The job's spec, for the listing written, created now, with the submitter's chunk
        size and item budget (``pixelrelay.pipeline.limits``)."""
        return JobSpec(
            job_id=self.job_id,
            input=self.input_uri,
            output=self.output_uri,
            options=self.options,
            backends=self.backends,
            total=listing.total,
            chunk_size=settings.chunk_size,
            item_budget_s=settings.item_budget_s,
            created_at=time.time(),
            follow_symlinks=self.follow_symlinks,
            listing_sha256=list(listing.digests),
        )


@dataclass(frozen=True, slots=True)
class SubmitContext:
    """What one submission talks to.

    Attributes:
        settings: the submitter's configuration.
        state: the job's Redis state.
        out_storage: the output's storage, rooted at the output (writes stay under it).
        app: the Celery app the first window is sent with.
        signer: signs the messages sent and job.json.
    """

    settings: Settings
    state: JobState
    out_storage: Storage
    app: Celery
    signer: Signer


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def normalize_location(uri: str) -> str:
    return uri.rstrip("/") if is_s3(uri) else os.path.abspath(uri)


def redis_client(settings: Settings) -> redis.Redis:
    if not settings.redis:
        raise ConfigError("PIXELRELAY_REDIS_URL: not set (or use `pixelrelay run`, which embeds Redis)")
    return redis.Redis.from_url(settings.redis, socket_timeout=30)


def _check_same(spec: JobSpec, input_uri: str, output_uri: str, options: JobOptions, backends: Backends) -> None:
    wanted = {"input": input_uri, "output": output_uri, "options": options, "backends": backends}
    for field, value in wanted.items():
        if getattr(spec, field) != value:
            raise ConfigError(
                f"--job-id: job {spec.job_id} exists with a different {field} "
                f"({getattr(spec, field)!r}); use a new job id"
            )


def normalize_backends(backends: Backends, allowed: str = "") -> Backends:
    """The job's backend specs in their one spelling (unknown kinds are a ConfigError).

    ``submit`` cannot see what the workers allow, so a spec that names a local path
    (``stages.registry.names_local_path``) is a ConfigError unless ``allowed`` (the
    submitter's own ``PIXELRELAY_ALLOWED_BACKENDS``) allows it."""
    allowlist = parse_allowlist(allowed)
    specs = {}
    for name in ("encoder", "planner", "decoder"):
        value = getattr(backends, name)
        try:
            spec = validate_spec(name, value) if value else None
        except ValueError as exc:
            raise ConfigError(f"--{name}: {exc}") from None
        if spec and names_local_path(spec) and not spec_allowed(name, spec, allowlist):
            raise ConfigError(
                f"--{name}: {spec} names a local path; workers load it only if their "
                "PIXELRELAY_ALLOWED_BACKENDS allows it: allow it there and here, or use a hub id"
            )
        specs[name] = spec
    return Backends(**specs)


def check_instruction(options: JobOptions, planner: str) -> None:
    """Refuse an edit/style instruction that the ``rules`` planner (``planner``, a spec)
    cannot map (ConfigError, exit 2)."""
    if options.task not in EDIT_TASKS or StageSpec.parse(planner).kind != "rules":
        return
    from pixelrelay.pipeline.stages.planners.edits import UnmappableInstructionError, map_instruction

    try:
        map_instruction(options.instruction, options.task)
    except UnmappableInstructionError as exc:
        raise ConfigError(f"--instruction: the rules planner {exc}") from None


def submit(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    options: JobOptions,
    backends: Backends | None = None,
    job_id: str | None = None,
    follow_symlinks: bool = False,
    incremental: bool = False,
) -> Submission:
    """Submit a new job, or resume ``job_id``; ConfigError (exit 2) for what is refused.

    Args:
        settings: the submitter's configuration (Redis, storage, signing, chunk and window sizes).
        input_uri: the input folder, ``s3://`` prefix or manifest file.
        output_uri: the output folder or ``s3://`` prefix.
        options: the job's options.
        backends: the job's backend specs (None: the workers' defaults).
        job_id: the job's id (None: a new one); an existing job is resumed.
        follow_symlinks: whether the listing and the workers' reads follow symlinks (a folder input).
        incremental: leave out inputs done and unchanged since the last jobs into the output.
    """
    if incremental and options.overwrite:
        raise ConfigError("--incremental: not with --overwrite (which re-processes every item)")
    check_chunk(settings.chunk_size, settings.item_budget_s)
    backends = normalize_backends(backends or Backends(), settings.allowed_backends)
    check_instruction(options, backends.planner or settings.planner)
    job_id = job_id or new_job_id()
    if not _JOB_ID_RE.fullmatch(job_id):
        raise ConfigError("--job-id: use letters, digits, '.', '_' and '-' (at most 128)")
    input_uri, output_uri = normalize_location(input_uri), normalize_location(output_uri)
    signer = settings.signer()  # no key (and not --insecure-no-signing): ConfigError, exit 2
    client = redis_client(settings)
    app = create_app(settings)
    out_storage = open_storage(output_uri, settings.s3_endpoint_url, root=output_uri)  # writes stay under it
    state = JobState(client, job_id, signer)
    context = SubmitContext(settings, state, out_storage, app, signer)
    resumed = True
    if state.exists():
        spec = state.spec()
        _check_same(spec, input_uri, output_uri, options, backends)
    elif out_storage.exists(spec_uri(output_uri, job_id)):
        spec = load_spec(out_storage, output_uri, job_id, signer)
        _check_same(spec, input_uri, output_uri, options, backends)
        restore_done(state, out_storage, spec)
    else:
        resumed = False
        in_storage = open_storage(input_uri, settings.s3_endpoint_url)
        request = JobRequest(job_id, input_uri, output_uri, options, backends, follow_symlinks)
        if incremental:
            return _submit_incremental(context, in_storage, request)
        items = list_items(input_uri, output_uri, in_storage, options.format, follow_symlinks)
        spec = request.spec(write_listing(out_storage, output_uri, job_id, items), settings)
        write_spec(out_storage, spec, signer)
    return _start(context, spec, resumed)


def _start(context: SubmitContext, spec: JobSpec, resumed: bool) -> Submission:
    already_done = context.state.counts().done
    seq = start(
        context.state,
        context.out_storage,
        spec,
        sender(context.app, context.signer, job_budget(spec)),
        context.settings.window,
    )
    registry = open_registry(context.settings.state_uri, context.settings.s3_endpoint_url)
    if registry is not None:  # after the job hash exists: a sweep never rebuilds a job being submitted
        registry.add(spec.job_id, spec.output)
    return Submission(
        job_id=spec.job_id, seq=seq, total=spec.total, resumed=resumed, already_done=already_done, output=spec.output
    )


def _submit_incremental(context: SubmitContext, in_storage: Storage, request: JobRequest) -> Submission:
    """A new job of what is new or changed (``producer.incremental``); none when nothing is."""
    out_storage, output_uri, job_id, options = context.out_storage, request.output_uri, request.job_id, request.options
    index = Incremental(out_storage, output_uri, request.input_uri, context.signer)
    try:
        index.fold()
        pairs = list_versioned_items(request.input_uri, output_uri, in_storage, options.format, request.follow_symlinks)
        listing = write_listing(out_storage, output_uri, job_id, index.select(pairs, options, request.backends))
        line = index.counts.line()
        if not listing.total:
            return Submission(
                job_id="",
                seq=0,
                total=0,
                resumed=False,
                already_done=0,
                output=output_uri,
                incremental=line,
                nothing_new=True,
            )
        index.record(job_id)
        spec = request.spec(listing, context.settings)
        write_spec(out_storage, spec, context.signer)
        index.write_summary(job_id)
    finally:
        index.close()
    submission = _start(context, spec, resumed=False)
    submission.incremental = line
    return submission
