"""The broker's visibility timeout is a backstop, not a bound on a batch: unset it is fixed,
whatever the chunk size and item budget; a value set must outlast two leases and a minute
(renewals keep a leased message's delivery time fresh, ``workers.lease``). A chunk's limits
come from its job (``pipeline.limits``): the spec carries the item budget, each stage message
Celery's time limits, and submit refuses a chunk no limit carries."""

from __future__ import annotations

import json
import time

import pytest
import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import Slot
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline.limits import HARD_LIMIT_MARGIN_S, MAX_CHUNK_BUDGET_S, celery_limits, check_chunk
from pixelrelay.pipeline.messages import Backends, ChunkMessage, ItemRecord, JobOptions, JobSpec
from pixelrelay.pipeline.settings import ConfigError, Settings
from pixelrelay.producer.submit import submit
from pixelrelay.workers.celery_app import create_app
from pixelrelay.workers.flow import chunk_chain
from pixelrelay.workers.lease import Lease, LeaseTiming
from tests.conftest import TEST_SIGNER


def test_unset_it_is_the_default_whatever_the_chunk(redis_url):
    for budget, chunk in ((900, 32), (10, 4)):
        settings = Settings.from_env(redis_url=redis_url, item_budget_s=budget, chunk_size=chunk, lease_s=60)
        assert settings.visibility_s() == C.DEFAULT_VISIBILITY_TIMEOUT_S
    app = create_app(settings)
    assert app.conf.broker_transport_options["visibility_timeout"] == C.DEFAULT_VISIBILITY_TIMEOUT_S


def test_an_explicit_one_is_used_when_it_outlasts_two_leases_and_refused_when_not(redis_url):
    ok = Settings.from_env(redis_url=redis_url, item_budget_s=600, chunk_size=64, lease_s=5, visibility_timeout_s=71)
    assert ok.visibility_s() == 71  # far under the chunk's budget: renewals keep its message fresh
    with pytest.raises(ConfigError) as err:
        Settings.from_env(redis_url=redis_url, lease_s=60, visibility_timeout_s=180)
    assert "PIXELRELAY_VISIBILITY_TIMEOUT_S=180" in str(err.value) and "(180 s" in str(err.value)


# --- limits that follow the job ----------------------------------------------------------------


def test_submit_refuses_a_chunk_whose_budget_no_limit_carries(redis_url, tmp_path):
    settings = Settings.from_env(redis_url=redis_url, chunk_size=145, item_budget_s=600)  # 87,000 s
    with pytest.raises(ConfigError) as err:
        submit(settings, str(tmp_path / "in"), str(tmp_path / "out"), JobOptions())
    message = str(err.value)
    assert "\n" not in message and message.startswith("--chunk-size 145: 145 items x 600 s item budget")
    assert f"over the {MAX_CHUNK_BUDGET_S} s a chunk may run; use --chunk-size 144 or less" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written
    check_chunk(144, 600)  # 86,400 s: carried


def test_the_job_spec_carries_its_item_budget_and_a_spec_without_one_still_reads():
    spec = JobSpec(job_id="j", input="/in", output="/out", total=4, chunk_size=64, item_budget_s=5)
    assert JobSpec.model_validate(spec.model_dump(mode="json")).item_budget_s == 5
    older = JobSpec(job_id="j", input="/in", output="/out").model_dump(mode="json")
    assert "item_budget_s" not in older  # a spec without a budget is written as before
    assert JobSpec.model_validate(older).item_budget_s is None  # each worker's own


def test_each_stage_message_carries_the_time_limits_of_its_jobs_chunk(redis_url):
    app = create_app(Settings.from_env(redis_url=redis_url))
    records = [ItemRecord(index=i, input=f"/in/{i}.png", output=f"/out/{i}.png") for i in range(8)]
    msg = ChunkMessage(
        job_id="j", seq=1, chunk=0, output="/out", options=JobOptions(), backends=Backends(), records=records
    )
    soft, hard = celery_limits(8, 5.0)
    assert hard == 8 * 5.0 + HARD_LIMIT_MARGIN_S and soft == hard - 30
    for sig in chunk_chain(app, msg, TEST_SIGNER, 5.0).tasks:
        assert (sig.options["soft_time_limit"], sig.options["time_limit"]) == (soft, hard)
    for sig in chunk_chain(app, msg, TEST_SIGNER).tasks:  # a job without a budget: the worker's defaults
        assert "time_limit" not in sig.options


def test_a_renewal_moves_its_messages_delivery_time_and_no_other(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/2")
    client.flushdb()
    mine, other = "pr:j:1:0:-:decode:aa", "pr:j:1:1:-:decode:bb"
    for tag, tid in (("t-mine", mine), ("t-other", other)):
        client.hset(keys.KOMBU_UNACKED, tag, json.dumps([{"headers": {"id": tid}, "body": "{}"}, "", "q"]))
        client.zadd(keys.KOMBU_UNACKED_INDEX, {tag: 1000.0})
    client.hset(keys.KOMBU_UNACKED, "t-junk", b"not json " + mine.encode())  # the broker's data is input
    lease = Lease(client, "j", Slot(1, 0), LeaseTiming(1.0, 5.0), 4, lambda _: None, task_id=mine)
    before = time.time()
    lease.renew()
    assert client.zscore(keys.KOMBU_UNACKED_INDEX, "t-mine") >= before
    assert client.zscore(keys.KOMBU_UNACKED_INDEX, "t-other") == 1000.0
    assert client.pttl(keys.lease("j", "1:0")) > 0
    client.hdel(keys.KOMBU_UNACKED, "t-mine")
    client.zrem(keys.KOMBU_UNACKED_INDEX, "t-mine")  # acked meanwhile: never put back
    lease.renew()
    assert client.zscore(keys.KOMBU_UNACKED_INDEX, "t-mine") is None
    client.flushdb()
    client.close()
