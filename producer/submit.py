"""Submit (or resume) a job: list the input, store the listing, send the first window.

Re-submitting a job id resumes it: done items are skipped and failed ones are tried again.
If Redis lost the job, its state is rebuilt from the manifest parts in storage.

A new job into an output that already holds results reuses each one whose fingerprint
answers the same request with the same models (``pipeline.fingerprint``), and re-processes
the rest; ``JobOptions.overwrite`` re-processes everything. Backend specs are normalised
here (``KIND[:MODEL]``) so that equal requests fingerprint equally; a stage the job leaves
unset runs the stage worker's own default, which the fingerprint's model part records.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass

import redis

from pixelrelay.jobs.files import iter_part_records, latest_seq, read_cancel, read_spec, spec_uri, write_listing, write_spec
from pixelrelay.pipeline.messages import Backends, JobOptions, JobSpec
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.stages.registry import validate_spec
from pixelrelay.pipeline.storage import is_s3, open_storage
from pixelrelay.producer.listing import list_items
from pixelrelay.workers.celery_app import create_app
from pixelrelay.jobs.feed import feed, finalize_if_complete
from pixelrelay.workers.flow import sender
from pixelrelay.jobs.state import JobState

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Submission:
    job_id: str
    seq: int
    total: int
    resumed: bool
    already_done: int


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


def normalize_backends(backends: Backends) -> Backends:
    """The job's backend specs in their one spelling (unknown kinds are a ConfigError)."""
    specs = {}
    for name in ("encoder", "planner", "decoder"):
        value = getattr(backends, name)
        try:
            specs[name] = validate_spec(name, value) if value else None
        except ValueError as exc:
            raise ConfigError(f"--{name}: {exc}") from None
    return Backends(**specs)


def submit(
    settings: Settings,
    input_uri: str,
    output_uri: str,
    options: JobOptions,
    backends: Backends | None = None,
    job_id: str | None = None,
) -> Submission:
    backends = normalize_backends(backends or Backends())
    job_id = job_id or new_job_id()
    if not _JOB_ID_RE.match(job_id):
        raise ConfigError("--job-id: use letters, digits, '.', '_' and '-' (at most 128)")
    input_uri, output_uri = normalize_location(input_uri), normalize_location(output_uri)
    client = redis_client(settings)
    app = create_app(settings)
    out_storage = open_storage(output_uri, settings.s3_endpoint_url)
    state = JobState(client, job_id)
    resumed = True
    if state.exists():
        spec = state.spec()
        _check_same(spec, input_uri, output_uri, options, backends)
    elif out_storage.exists(spec_uri(output_uri, job_id)):
        spec = read_spec(out_storage, output_uri, job_id)
        _check_same(spec, input_uri, output_uri, options, backends)
        done = [row["index"] for row in iter_part_records(out_storage, output_uri, job_id) if row["status"] == "done"]
        state.restore(latest_seq(out_storage, output_uri, job_id), done, read_cancel(out_storage, output_uri, job_id))
    else:
        resumed = False
        in_storage = open_storage(input_uri, settings.s3_endpoint_url)
        items = list_items(input_uri, output_uri, in_storage, options.format)
        total = write_listing(out_storage, output_uri, job_id, items)
        spec = JobSpec(
            job_id=job_id,
            input=input_uri,
            output=output_uri,
            options=options,
            backends=backends,
            total=total,
            chunk_size=settings.chunk_size,
            created_at=time.time(),
        )
        write_spec(out_storage, spec)
    seq = state.start_submission(spec)
    already_done = state.counts().done
    if feed(sender(app), state, out_storage, spec, seq, settings.window) == 0:
        finalize_if_complete(state, out_storage, spec, seq)  # nothing left to do
    return Submission(job_id=job_id, seq=seq, total=spec.total, resumed=resumed, already_done=already_done)
