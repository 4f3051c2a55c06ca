"""Fixtures of the in-process worker tests: a Redis database of their own and jobs run
through the delivery policy (``tests/workers/policy_jobs.py``)."""

from __future__ import annotations

import pytest
import redis

from pixelrelay.workers.policy import Limits
from tests.workers.policy_jobs import Job


@pytest.fixture()
def client(redis_url):
    # A database of its own: workers' sweepers elsewhere in the session must not see these jobs.
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/6")
    yield client
    client.flushdb()
    client.close()


@pytest.fixture()
def make_job(client, tmp_path):
    def make(widths: list[int], chunk_size: int = 4, **limits) -> Job:
        return Job(client, tmp_path, widths, chunk_size, Limits(**limits))

    return make
