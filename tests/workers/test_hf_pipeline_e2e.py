"""A job through all three Hugging Face backends, S3 to S3, in real workers.

The tiny random models are laid out in a hub cache under real hub ids and the workers run
with HF_HUB_OFFLINE=1, so they load through exactly the path a downloaded model takes.
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
import redis
from PIL import Image

from tests.conftest import WorkerPool, run_cli, worker_env
from tests.images import good_images
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_blip, make_tiny_qwen2, make_tiny_swin2sr

pytestmark = pytest.mark.e2e

HUB_IDS = {
    "encoder": "Salesforce/blip-image-captioning-base",
    "planner": "Qwen/Qwen2.5-0.5B-Instruct",
    "decoder": "caidas/swin2SR-classical-sr-x2-64",
}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    built = tmp_path_factory.mktemp("tiny-hf")
    cache = tmp_path_factory.mktemp("hub-cache")
    install_in_hub_cache(make_tiny_blip(built / "blip"), cache, HUB_IDS["encoder"])
    install_in_hub_cache(make_tiny_qwen2(built / "qwen"), cache, HUB_IDS["planner"])
    install_in_hub_cache(make_tiny_swin2sr(built / "swin2sr"), cache, HUB_IDS["decoder"])
    return cache


def test_job_through_hf_caption_llm_and_sr(hub_cache, redis_url, s3_server, s3_bucket, s3_client, tmp_path):
    isolated = redis_url.rsplit("/", 1)[0] + "/4"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(isolated, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    backends = {
        stage: f"{kind}:{HUB_IDS[stage]}"
        for stage, kind in (("encoder", "hf-caption"), ("planner", "hf-llm"), ("decoder", "hf-sr"))
    }
    files = {k: v for k, v in list(good_images(6).items())}
    for rel, data in files.items():
        s3_client.put_object(Bucket=s3_bucket, Key=f"in/{rel}", Body=data)

    pool = WorkerPool(env, tmp_path, backends).start()
    try:
        job_id = "hf-" + uuid.uuid4().hex[:6]
        result = run_cli(
            [
                "submit",
                f"s3://{s3_bucket}/in",
                "--out",
                f"s3://{s3_bucket}/out",
                "--job-id",
                job_id,
                "--task",
                "upscale",
                "--scale",
                "2",
                "--instruction",
                "restore gently",
                "--wait",
            ],
            env,
        )
        assert result.returncode == 0, result.stderr + pool.logs()
    finally:
        pool.stop()
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"out/_jobs/{job_id}/manifest.jsonl")["Body"].read()
    rows = [json.loads(line) for line in body.splitlines()]
    assert len(rows) == len(files)
    for row in rows:
        assert row["status"] == "done", row["error"]
        assert row["backends"] == backends
        assert row["description"]["caption"] is not None  # the captioner ran
        assert row["plan"]["raw"]  # the LLM's own text is kept
        assert row["plan"]["scale"] == 2
        rel = row["input"].split("/in/", 1)[1]
        source = Image.open(io.BytesIO(files[rel]))
        key = row["output"].split("/", 3)[3]
        out = Image.open(io.BytesIO(s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()))
        assert out.size == (2 * source.width, 2 * source.height)
