"""A chunk as a Celery chain: encode -> plan -> decode, one message per stage.

Every stage message gets a task id that names its job, submission, chunk, part and stage
(``jobs.chunks.task_id``) plus a random suffix; a retry keeps its id. The sweep reads these
ids from the queue lists to tell a waiting chain from a lost one.

Every body sent is signed (``pipeline.signing``, kind ``chunk:encode``); each stage signs
the body it returns for the next one (``workers.tasks.run_stage``).

The Celery-free rest of the flow (which chunk goes next, finishing a job) is
``pixelrelay.jobs.feed``; ``sender`` adapts it to a Celery app.
"""

from __future__ import annotations

from celery import Celery, chain

from pixelrelay.jobs.chunks import task_id
from pixelrelay.jobs.feed import Send
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.pipeline.signing import Signer
from pixelrelay.workers.celery_app import task_name


def signed_body(signer: Signer, stage: str, message: ChunkMessage) -> dict:
    """The wire body of ``message`` for ``stage``: its oldest wire version, signed."""
    return signer.sign("chunk:" + stage, message.model_dump(mode="json"))


def chunk_chain(app: Celery, message: ChunkMessage, signer: Signer):
    body = signed_body(signer, "encode", message)
    return chain(
        app.signature(task_name("encode"), args=(body,), immutable=True, task_id=task_id(message, "encode")),
        app.signature(task_name("plan"), task_id=task_id(message, "plan")),
        app.signature(task_name("decode"), task_id=task_id(message, "decode")),
    )


def sender(app: Celery, signer: Signer) -> Send:
    """A ``Send`` that enqueues each chunk as a chain on ``app``'s broker, signed."""

    def send(message: ChunkMessage) -> None:
        chunk_chain(app, message, signer).apply_async()

    return send
