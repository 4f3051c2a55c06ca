"""Jobs run in-process through the delivery policy: a real Redis and real ``JobState``,
local-folder storage, and a stub ``send`` that collects chains instead of a broker.

Worker deaths are simulated by a stage body that raises ``WorkerDied``, a BaseException
the policy does not catch: like a killed process, it leaves the delivery counted."""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.feed import feed
from pixelrelay.jobs.files import manifest_uri, write_listing, write_spec
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.messages import Backends, ChunkMessage, Item, ItemRecord, JobSpec
from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
from pixelrelay.pipeline.stages.registry import register
from pixelrelay.pipeline.storage import open_storage
from pixelrelay.workers.policy import Delivery, DeliveryPolicy, Limits
from pixelrelay.workers.runtime import Runtime
from pixelrelay.workers.tasks import STAGE_BODIES
from tests.conftest import TEST_SIGNER
from tests.images import photo_like

BAD_WIDTH = 13


class RaisingDecoder(ClassicDecoder):
    """``classic``, but any batch holding an image ``BAD_WIDTH`` pixels wide raises."""

    kind = "raising"

    def restore(self, images, plans):
        if any(image.width == BAD_WIDTH for image in images):
            raise ValueError("cannot restore this one")
        return super().restore(images, plans)


register("decoder", "raising", f"{__name__}:RaisingDecoder")


class WorkerDied(BaseException):
    """Stands for the worker process dying mid-task (not an Exception: nothing catches it)."""


class Job:
    """A job of ``widths`` images in ``root``, created as the producer would, whose chains
    are run in-process through the policy; ``sent`` collects the chains it sends."""

    def __init__(self, client: redis.Redis, root: Path, widths: list[int], chunk_size: int, limits: Limits) -> None:
        self.root, self.sent = root, []
        self.state = JobState(client, "pol-" + uuid.uuid4().hex[:8], TEST_SIGNER)
        (root / "in").mkdir()
        items = []
        for i, width in enumerate(widths):
            photo_like(width, 16, i).save(root / "in" / f"{i}.png")
            items.append(Item(index=i, input=str(root / "in" / f"{i}.png"), output=str(root / "out" / f"{i}.png")))
        self.output = str(root / "out")
        self.storage = open_storage(self.output)
        listing = write_listing(self.storage, self.output, self.state.job_id, items)
        self.spec = JobSpec(
            job_id=self.state.job_id,
            input=str(root / "in"),
            output=self.output,
            total=listing.total,
            chunk_size=chunk_size,
            listing_sha256=list(listing.digests),
        )
        write_spec(self.storage, self.spec, TEST_SIGNER)
        self.seq = self.state.start_submission(self.spec)
        self.policy = DeliveryPolicy(self.state, self.sent.append, lambda uri: self.storage, limits)

    def feed(self, window: int) -> None:
        feed(self.sent.append, self.state, self.storage, self.spec, self.seq, window)

    def message(self, indices: list[int], **update) -> ChunkMessage:
        records = [
            ItemRecord(index=i, input=str(self.root / "in" / f"{i}.png"), output=str(self.root / "out" / f"{i}.png"))
            for i in indices
        ]
        fields = dict(
            job_id=self.state.job_id,
            seq=self.seq,
            chunk=0,
            output=self.output,
            options=self.spec.options,
            backends=Backends(),
            records=records,
        )
        return ChunkMessage(**{**fields, **update})

    def manifest(self) -> dict[int, dict]:
        rows = map(json.loads, self.storage.get(manifest_uri(self.output, self.state.job_id)).splitlines())
        return {row["index"]: row for row in rows}

    def delivery_keys(self) -> list[bytes]:
        return self.state.r.keys(keys.DELIVERIES.format(job_id=self.state.job_id, stage="*", seq="*", chunk="*"))


def run_chains(job: Job, rt: Runtime) -> None:
    """Run every sent chain through encode -> plan -> decode, as the workers would."""
    while job.sent:
        msg = job.sent.pop(0)
        for stage, body in STAGE_BODIES.items():
            msg = job.policy.deliver(Delivery(stage, msg), functools.partial(body, rt, job.state))
            assert isinstance(msg, ChunkMessage), msg
