"""``pixelrelay gc``: remove old jobs' bookkeeping files from an output, keeping manifests.

Invariants: only objects under ``OUTPUT/_jobs/<job_id>/`` are deleted (never outputs, never
``_state/``; a folder whose name is not a job id is left alone); a running job is never
touched (without Redis, a job with no manifest or with parts newer than it is skipped unless
``--force``); ``--dry-run`` deletes nothing. A collected job can no longer be resumed.
Locally no symlink is followed: a linked ``_jobs`` or job folder is skipped with a warning,
and a delete whose real path leaves the output is refused. Temp files killed writers left
anywhere in a local output are removed too (``Storage.remove_debris``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import redis

from pixelrelay.jobs.files import CANCEL_NAME, JOB_SPEC_NAME, JOBS_DIR, MANIFEST_NAME
from pixelrelay.pipeline.messages import JOB_ID_PATTERN
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.pipeline.storage import is_s3, join_uri, open_storage
from pixelrelay.pipeline.storage.base import ObjectInfo, StorageEscapeError
from pixelrelay.pipeline.storage.local import sorted_walk

KEPT = (MANIFEST_NAME, JOB_SPEC_NAME, CANCEL_NAME)  # kept unless --include-manifests
REMOVED_FOLDERS = ("parts", "groups", "inputs")  # groups: merged parts (jobs.merge)
REMOVED_FILES = ("report.html", "contact-sheet.jpg")
_UNITS = {"m": 60, "h": 3600, "d": 86400}
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
_JOB_ID = re.compile(JOB_ID_PATTERN)


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m`` -> seconds (ConfigError otherwise)."""
    match = _AGE.match(text.strip())
    if not match:
        raise ConfigError(f"--older-than: expected a number with a unit m, h or d (e.g. 30d, 12h, 90m), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class JobFiles:
    job_id: str
    root: str
    objects: list[ObjectInfo] = field(default_factory=list)

    def relative(self, info: ObjectInfo) -> str:
        return info.uri[len(self.root) :].lstrip("/")

    @property
    def newest(self) -> float:
        return max((o.modified for o in self.objects), default=0.0)

    def find(self, name: str) -> ObjectInfo | None:
        return next((o for o in self.objects if self.relative(o) == name), None)

    def removable(self, include_manifests: bool) -> list[ObjectInfo]:
        if include_manifests:
            return list(self.objects)
        out = []
        for info in self.objects:
            rel = self.relative(info)
            if ("/" in rel and rel.split("/", 1)[0] in REMOVED_FOLDERS) or rel in REMOVED_FILES:
                out.append(info)
        return out


def iter_jobs(storage, output: str, stream: TextIO | None = None) -> Iterator[JobFiles]:
    """Each job folder under ``OUTPUT/_jobs/`` with its objects (the listing is sorted, so
    one job's objects are held at a time); locally without following a symlink, each one
    met is named on ``stream``."""
    base = join_uri(output, JOBS_DIR).rstrip("/") + "/"  # not "_jobsX/...": only under _jobs/
    infos = storage.list_info(base) if is_s3(output) else _local_infos(base, stream or sys.stdout)
    current: JobFiles | None = None
    for info in infos:
        job_id = info.uri[len(base) :].lstrip("/").split("/", 1)[0]
        if current is None or current.job_id != job_id:
            if current is not None:
                yield current
            current = JobFiles(job_id, join_uri(output, JOBS_DIR, job_id))
        current.objects.append(info)
    if current is not None:
        yield current


def _local_infos(base: str, stream: TextIO) -> Iterator[ObjectInfo]:
    """The files under the local folder ``base``, sorted, no symlinked folder entered (nor
    ``base`` itself when it is a link): each link skipped is named on ``stream``."""
    folder = base.rstrip("/")
    try:
        st = os.lstat(folder)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        stream.write(f"pixelrelay gc: skipped {folder}: a symlink, not followed\n")
        return
    if not stat.S_ISDIR(st.st_mode):
        return

    def linked_folder(path: str, entry: os.DirEntry) -> bool:
        if entry.is_symlink() and entry.is_dir():
            stream.write(f"pixelrelay gc: skipped {path}: a symlink, not followed\n")
            return True
        return False

    for path, entry in sorted_walk(folder, True, linked_folder):
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:  # gone since the walk
            continue
        yield ObjectInfo(path, info.st_size, info.st_mtime)


class RunningCheck:
    """Whether a job may still be running: Redis when reachable, else its files."""

    def __init__(self, settings: Settings, stream: TextIO) -> None:
        self.client = None
        if settings.redis:
            from pixelrelay.producer.submit import redis_client

            try:
                client = redis_client(settings)
                client.ping()
                self.client = client
            except (redis.RedisError, OSError) as exc:
                stream.write(f"pixelrelay gc: Redis unreachable ({type(exc).__name__}): judging jobs by their files\n")

    def reason_to_keep(self, job: JobFiles, force: bool) -> str | None:
        if self.client is not None:
            from pixelrelay.jobs.state import JobState, is_finished

            state = JobState(self.client, job.job_id)
            if state.exists() and not is_finished(state.info()):
                return "running (Redis)"
            return None
        if force:
            return None
        manifest = job.find(MANIFEST_NAME)
        if manifest is None:
            return "no manifest and no Redis to ask whether it runs (--force to remove it)"
        if any(o.modified > manifest.modified for o in job.objects if job.relative(o).startswith("parts/")):
            return "parts newer than its manifest: a later submission may run (--force to remove it)"
        return None


@dataclass
class GcResult:
    jobs: int = 0  # jobs collected (or that would be, in a dry run)
    objects: int = 0
    bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # job id -> why it was kept
    debris: int = 0  # temp files left by killed writers, removed


def collect(
    settings: Settings,
    output: str,
    older_than_s: float,
    *,
    dry_run: bool = False,
    include_manifests: bool = False,
    force: bool = False,
    stream: TextIO | None = None,
    now: float | None = None,
) -> GcResult:
    """Remove (or list) old jobs' parts, listings and reports under ``output``.

    Args:
        settings: for Redis, to tell running jobs apart.
        output: the output root.
        older_than_s: collect jobs whose newest object is older than this.
        dry_run: delete nothing; report what would go.
        include_manifests: remove whole job folders, manifests included.
        force: without Redis, collect jobs that may still be running.
        stream: where to print what is removed; None: nowhere.
        now: the current time (tests).

    Returns:
        What was removed, and the jobs kept with the reason.
    """
    stream = stream or sys.stdout
    storage = open_storage(output, settings.s3_endpoint_url, settings, root=output)  # deletes stay under it
    cutoff = (time.time() if now is None else now) - older_than_s
    check = RunningCheck(settings, stream)
    result = GcResult()
    verb = "would remove" if dry_run else "removed"
    for job in iter_jobs(storage, output, stream):
        if not _JOB_ID.fullmatch(job.job_id):
            continue
        if job.newest > cutoff:
            continue
        removable = job.removable(include_manifests)
        if not removable:
            continue
        why = check.reason_to_keep(job, force)
        if why:
            result.skipped[job.job_id] = why
            stream.write(f"kept {job.job_id}: {why}\n")
            continue
        size = sum(o.size for o in removable)
        for info in removable:
            if dry_run:
                stream.write(f"  {verb} {info.uri} ({human_size(info.size)})\n")
            else:
                _delete(storage, info.uri, stream)
        if not dry_run and not is_s3(output):
            _prune_folders(job.root, include_manifests)
        result.jobs, result.objects, result.bytes = (
            result.jobs + 1,
            result.objects + len(removable),
            result.bytes + size,
        )
        stream.write(
            f"{verb} {len(removable)} objects, {human_size(size)} of job {job.job_id} "
            f"(last written {time.strftime('%Y-%m-%d %H:%M', time.localtime(job.newest))})\n"
        )
    if not dry_run:
        result.debris = storage.remove_debris(output)
        if result.debris:
            stream.write(f"removed {result.debris} temp files left by killed writers\n")
    stream.write(
        f"{verb} {result.objects} objects, {human_size(result.bytes)}, from {result.jobs} jobs"
        + (f"; kept {len(result.skipped)} jobs that may be running" if result.skipped else "")
        + "\n"
    )
    stream.flush()
    return result


def _delete(storage, uri: str, stream: TextIO) -> None:
    """Delete one object; one whose real path leaves the output (a folder swapped for a link
    meanwhile) is refused and named on ``stream``."""
    try:
        storage.delete(uri)
    except StorageEscapeError as exc:
        stream.write(f"pixelrelay gc: not deleted: {exc}\n")


def _prune_folders(root: str, whole: bool) -> None:
    """Remove the job's now-empty local folders (S3 has none); no symlink is followed."""
    if os.path.islink(root):
        return
    for name in REMOVED_FOLDERS:
        top = os.path.join(root, name)
        if os.path.islink(top):
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda x: -len(x[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    if whole:
        try:
            os.rmdir(root)
        except OSError:
            pass
