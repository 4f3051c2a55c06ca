"""A chunk as a Celery chain: encode -> plan -> decode, one message per stage.

Each message's task id names its slot (``pixelrelay.jobs.chunks.task_id``; a retry keeps
it), so the sweep tells a waiting chain from a lost one. Bodies are signed (kind
``chunk:encode``). ``argsrepr`` is set up front (``args_repr``) so that Celery never walks
the signed body with ``saferepr``. ``sender`` adapts the Celery-free ``pixelrelay.jobs.feed``
to an app.

Each message carries Celery's time limits for its chunk (``pixelrelay.pipeline.limits``),
from its job's item budget (``ItemBudget``): the worker's own settings apply only to a job
whose spec has none. A retry and the chain's later stages keep them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, chain

from pixelrelay.jobs.chunks import task_id
from pixelrelay.jobs.feed import Send
from pixelrelay.jobs.state import JobState
from pixelrelay.pipeline.limits import celery_limits
from pixelrelay.pipeline.messages import ChunkMessage, JobSpec
from pixelrelay.pipeline.signing import Signer
from pixelrelay.workers.celery_app import task_name

ItemBudget = Callable[[str], float | None]  # a job id -> its item budget (None: each worker's own)


def no_budget(job_id: str) -> None:
    return None


def job_budget(spec: JobSpec) -> ItemBudget:
    """The ``ItemBudget`` of one job's sender."""
    return lambda job_id: spec.item_budget_s if job_id == spec.job_id else None


def stored_budgets(client: redis.Redis, signer: Signer) -> ItemBudget:
    """The ``ItemBudget`` of a sender of any job: read from each job's signed spec (None when
    it cannot be read: the message goes without limits of its own)."""

    def budget(job_id: str) -> float | None:
        try:
            return JobState(client, job_id, signer).spec().item_budget_s
        except Exception:
            return None

    return budget


def signed_body(signer: Signer, stage: str, message: ChunkMessage) -> dict:
    """The wire body of ``message`` for ``stage``: its oldest wire version, signed."""
    return signer.sign("chunk:" + stage, message.model_dump(mode="json"))


def args_repr(message: ChunkMessage, stage: str) -> str:
    """The short stand-in for a stage message's arguments in logs, events and Flower."""
    part = f" part {message.part}" if message.part else ""
    return f"job {message.job_id} seq {message.seq} chunk {message.chunk}{part} {stage}"


def chunk_chain(app: Celery, message: ChunkMessage, signer: Signer, item_budget_s: float | None = None):
    """The chain of ``message``'s three stages; with ``item_budget_s``, each message carries
    Celery's time limits for its chunk."""
    body = signed_body(signer, "encode", message)
    limits: dict[str, Any] = {}
    if item_budget_s is not None:
        soft, hard = celery_limits(len(message.records), item_budget_s)
        limits = {"soft_time_limit": soft, "time_limit": hard}

    def options(stage: str) -> dict:
        ids = {"task_id": task_id(message, stage), "argsrepr": args_repr(message, stage), "kwargsrepr": "{}"}
        return ids | limits

    return chain(
        app.signature(task_name("encode"), args=(body,), immutable=True, **options("encode")),
        app.signature(task_name("plan"), **options("plan")),
        app.signature(task_name("decode"), **options("decode")),
    )


def sender(app: Celery, signer: Signer, budget: ItemBudget = no_budget) -> Send:
    """A ``Send`` that enqueues each chunk as a chain on ``app``'s broker, signed, with the
    time limits of its job's item budget (``budget``)."""

    def send(message: ChunkMessage) -> None:
        chunk_chain(app, message, signer, budget(message.job_id)).apply_async()

    return send
