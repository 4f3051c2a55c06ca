"""A chunk as a Celery chain: encode -> plan -> decode, one message per stage.

Each message's task id names its slot (``pixelrelay.jobs.chunks.task_id``; a retry keeps
it), so the sweep tells a waiting chain from a lost one. Bodies are signed (kind
``chunk:encode``). ``argsrepr`` is set up front (``args_repr``) so that Celery never walks
the signed body with ``saferepr``. ``sender`` adapts the Celery-free ``pixelrelay.jobs.feed``
to an app.
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


def args_repr(message: ChunkMessage, stage: str) -> str:
    """The short stand-in for a stage message's arguments in logs, events and Flower."""
    part = f" part {message.part}" if message.part else ""
    return f"job {message.job_id} seq {message.seq} chunk {message.chunk}{part} {stage}"


def chunk_chain(app: Celery, message: ChunkMessage, signer: Signer):
    body = signed_body(signer, "encode", message)

    def options(stage: str) -> dict:
        return {"task_id": task_id(message, stage), "argsrepr": args_repr(message, stage), "kwargsrepr": "{}"}

    return chain(
        app.signature(task_name("encode"), args=(body,), immutable=True, **options("encode")),
        app.signature(task_name("plan"), **options("plan")),
        app.signature(task_name("decode"), **options("decode")),
    )


def sender(app: Celery, signer: Signer) -> Send:
    """A ``Send`` that enqueues each chunk as a chain on ``app``'s broker, signed."""

    def send(message: ChunkMessage) -> None:
        chunk_chain(app, message, signer).apply_async()

    return send
