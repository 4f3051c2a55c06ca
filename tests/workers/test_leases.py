"""Leases and the watchdog, in-process against a real Redis: a hung model call keeps its
lease only for its budget, then its items fail with "timed out" and the chunk finishes; a
redelivered message of a finished chain is dropped."""

from __future__ import annotations

import threading
import time

import redis

from pixelrelay.jobs import keys
from pixelrelay.jobs.chunks import ChunksInFlight, Slot
from pixelrelay.jobs.files import part_uri
from pixelrelay.pipeline.messages import ChunkMessage
from pixelrelay.workers.lease import WATCHDOG_EXIT_CODE, LeaseTiming, deliver_leased
from pixelrelay.workers.policy import Delivery, Limits, Stale
from pixelrelay.workers.watch import model_call
from tests.conftest import wait_until
from tests.workers.policy_jobs import Job, WorkerDied


def renewed(client: redis.Redis, key: str, times: int = 1) -> None:
    """Let the lease at ``key`` lapse (deleted) and wait for the heartbeat to write it again,
    ``times`` over: only a renewal brings it back."""
    for _ in range(times):
        client.delete(key)
        wait_until(lambda: client.exists(key), timeout=5, interval=0.005)


def test_a_hung_model_call_loses_its_lease_after_its_budget_and_only_its_item_times_out(client, tmp_path):
    """Item 0 waits for the model, item 1 hangs in it, item 2 finished before: after the
    call's budget item 1 fails alone, item 0 goes on in a chain of its own, item 2 keeps its
    result, and the chunk finishes with the next chunk fed once."""
    job = Job(client, tmp_path, [20, 21, 22, 23], 3, Limits())
    job.feed(window=1)
    msg = job.sent.pop()
    msg.records[2].status = "done"  # finished before the hang: keeps its result
    lease = keys.lease(job.state.job_id, Slot.of(msg).name)
    timing = LeaseTiming(lease_s=0.3, item_budget_s=0.6)  # 2 pending items: 1.2 s, then 0.6 s for the call on one
    released, exits, errors = threading.Event(), [], []

    def hung(m: ChunkMessage) -> None:  # a model call that never returns
        with model_call([m.records[1]]):
            released.wait(30)
        raise WorkerDied()  # what os._exit does to the call, in this test's terms

    def fake_exit(code: int) -> None:
        exits.append((code, time.monotonic()))

    def worker() -> None:
        try:
            deliver_leased(job.policy, Delivery("decode", msg), hung, timing, exit=fake_exit)
        except WorkerDied:
            pass
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        wait_until(lambda: client.exists(lease), timeout=5, interval=0.005)  # taken with the entry
        renewed(client, lease)  # renewed while it hangs
        wait_until(lambda: exits, timeout=5, interval=0.02)
        assert exits[0][0] == WATCHDOG_EXIT_CODE
        assert 0.5 <= exits[0][1] - started <= 1.1  # the call's own budget, not the chunk's
        wait_until(lambda: not client.exists(lease), timeout=0.6, interval=0.02)  # no renewal after the budget
    finally:
        released.set()
        thread.join(10)
    assert errors == []
    assert [(m.part, m.feeds, [r.index for r in m.records]) for m in job.sent] == [("0", False, [0]), ("", True, [3])]
    assert ChunksInFlight(client, job.state.job_id).get(Slot.of(msg)) is None
    single = job.sent.pop(0)
    assert ChunksInFlight(client, job.state.job_id).get(Slot.of(single)).stage == "encode"  # tracked when sent
    for stage in ("encode", "plan", "decode"):
        single = job.policy.deliver(Delivery(stage, single), lambda m: setattr(m.records[0], "status", "done"))
    job.policy.deliver(Delivery("decode", job.sent.pop()), lambda m: setattr(m.records[0], "status", "done"))
    rows = job.manifest()
    assert sorted(rows) == [0, 1, 2, 3]  # every item once
    assert rows[1]["error"] == "decode: timed out after 0.6 s"
    assert [rows[i]["status"] for i in (0, 2, 3)] == ["done"] * 3
    assert (job.state.counts().done, job.state.counts().failed) == (3, 1)


def test_a_hang_outside_a_model_call_sends_every_pending_item_on_alone(client, tmp_path):
    """No call names a suspect: each pending item goes on in its own chain, where a hang
    fails that item alone."""
    job = Job(client, tmp_path, [20, 21], 4, Limits())
    msg = job.message([0, 1], feeds=False)  # not fed: nothing to feed after it
    exits: list[int] = []
    timing = LeaseTiming(lease_s=0.3, item_budget_s=0.2)
    released = threading.Event()

    def stuck(m: ChunkMessage) -> None:
        released.wait(30)
        raise WorkerDied()

    thread = threading.Thread(target=lambda: _deliver_dying(job, msg, stuck, timing, exits))
    thread.start()
    wait_until(lambda: exits, timeout=5, interval=0.02)
    released.set()
    thread.join(10)
    assert [(m.part, [r.index for r in m.records]) for m in job.sent] == [("0", [0]), ("1", [1])]
    assert job.storage.exists(part_uri(job.output, job.state.job_id, 0, job.seq))  # empty: a redelivery is stale
    assert job.policy.deliver(Delivery("decode", job.message([0, 1])), lambda m: None) == Stale()


def _deliver_dying(job: Job, msg: ChunkMessage, work, timing: LeaseTiming, exits: list[int]) -> None:
    try:
        deliver_leased(job.policy, Delivery("decode", msg), work, timing, exit=exits.append)
    except WorkerDied:
        pass


def test_a_redelivered_message_of_a_finished_chain_is_dropped(client, tmp_path):
    job = Job(client, tmp_path, [20, 21], 4, Limits())
    ran = []
    first = job.policy.deliver(
        Delivery("decode", job.message([0, 1])), lambda m: [r.__setattr__("status", "done") for r in m.records]
    )
    assert isinstance(first, ChunkMessage) and job.state.counts().done == 2
    part = part_uri(job.output, job.state.job_id, 0, job.seq)
    part_before = job.storage.get(part)

    again = job.policy.deliver(Delivery("encode", job.message([0, 1])), ran.append)  # e.g. after the visibility timeout

    assert again == Stale() and ran == []
    assert job.delivery_keys() == []  # not counted as a delivery
    assert job.storage.get(part) == part_before and len(job.manifest()) == 2


def test_a_delivery_of_a_chain_in_flight_runs_and_moves_its_entry_to_the_next_stage(client, tmp_path):
    job = Job(client, tmp_path, [20, 21], 4, Limits())
    job.feed(window=1)
    msg = job.sent.pop()
    out = job.policy.deliver(Delivery("encode", msg), lambda m: None)
    assert isinstance(out, ChunkMessage)
    assert ChunksInFlight(client, job.state.job_id).get(Slot.of(msg)).stage == "plan"


def test_a_redelivered_message_of_a_finished_job_is_dropped(client, tmp_path):
    job = Job(client, tmp_path, [20], 4, Limits())
    job.state.finish(job.seq, "manifest", 1, 0)  # e.g. a split chunk's whole message, restored late
    ran = []
    assert job.policy.deliver(Delivery("decode", job.message([0])), ran.append) == Stale()
    assert ran == []


def test_deliveries_share_one_heartbeat_thread_and_take_the_lease_with_the_entry(client, tmp_path):
    """The heartbeat thread is started once per process, not per delivery; each delivery's
    lease exists by the time its work runs (written in the same transaction as the chain's
    entry) and is renewed while the work outlasts ``lease_s``."""
    job = Job(client, tmp_path, [20, 21, 22, 23], 2, Limits())
    job.feed(window=2)
    timing = LeaseTiming(lease_s=0.3, item_budget_s=30)
    seen = []

    def work(m: ChunkMessage) -> None:
        key = keys.lease(job.state.job_id, Slot.of(m).name)
        entry = ChunksInFlight(client, job.state.job_id).get(Slot.of(m))
        seen.append((client.get(key) is not None, entry.stage))
        renewed(client, key)
        seen.append((client.get(key) is not None, None))

    for msg in list(job.sent):
        out = deliver_leased(job.policy, Delivery("encode", msg), work, timing, exit=lambda code: None)
        assert isinstance(out, ChunkMessage)
    assert seen == [(True, "encode"), (True, None)] * 2
    beats = [t for t in threading.enumerate() if t.name == "pixelrelay-lease"]
    assert len(beats) == 1 and beats[0].is_alive()


def test_one_leases_failing_renewal_does_not_stop_the_heartbeat_for_the_others(client):
    from pixelrelay.workers.lease import Lease

    class Broken:
        def set(self, *args, **kwargs):
            raise RuntimeError("not a Redis error")

    timing = LeaseTiming(lease_s=0.3, item_budget_s=30)
    good = Lease(client, "hb-" + str(time.monotonic_ns()), Slot(1, 0), timing, 1, lambda budget: None)
    bad = Lease(Broken(), "hb-bad", Slot(1, 0), timing, 1, lambda budget: None)
    with bad, good:
        good.renew()  # what the policy's admission transaction writes first
        renewed(client, good.key, times=3)  # with the broken one failing beside it
    assert [t for t in threading.enumerate() if t.name == "pixelrelay-lease" and t.is_alive()]
    client.delete(good.key)
