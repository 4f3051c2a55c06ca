"""A chunk as a Celery chain: encode -> plan -> decode, one message per stage.

The Celery-free rest of the flow (which chunk goes next, finishing a job) is
``pixelrelay.jobs.feed``; ``sender`` adapts it to a Celery app.
"""

from __future__ import annotations

from celery import Celery, chain

from pixelrelay.jobs.feed import Send
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.workers.celery_app import task_name


def chunk_chain(app: Celery, message: ChunkMessage):
    body = message.model_dump(mode="json")
    return chain(
        app.signature(task_name("encode"), args=(body,), immutable=True),
        app.signature(task_name("plan")),
        app.signature(task_name("decode")),
    )


def sender(app: Celery) -> Send:
    """A ``Send`` that enqueues each chunk as a chain on ``app``'s broker."""

    def send(message: ChunkMessage) -> None:
        chunk_chain(app, message).apply_async()

    return send
