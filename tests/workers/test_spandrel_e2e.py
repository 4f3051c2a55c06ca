"""Jobs through the spandrel decoder in real workers: two tiny random checkpoints of spandrel's
own classes, one a hub file (laid out in a hub cache under a hub id, HF_HUB_OFFLINE=1) and one
an S3 object (moto server, downloaded into the worker's checkpoint cache), listed in one spec;
the plan picks the model by scale, per job."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from PIL import Image

from tests.conftest import REPO, WorkerPool, worker_env
from tests.images import good_images
from tests.pipeline.hf_fixtures import install_in_hub_cache

pytestmark = pytest.mark.e2e

pytest.importorskip("spandrel", reason="the spandrel decoder needs the spandrel extra")

HUB_FILE = "someone/compact-sr/2x-compact.safetensors"


def _manifest(out: Path, job_id: str) -> list[dict]:
    return [json.loads(line) for line in (out / "_jobs" / job_id / "manifest.jsonl").read_text().splitlines()]


def test_jobs_through_spandrel_models_from_the_hub_and_s3(redis_url, s3_server, s3_bucket, s3_client, tmp_path):
    from tests.pipeline import spandrel_fixtures as sf

    repo = tmp_path / "repo"
    sf.save(sf.build("compact", scale=2), repo / "2x-compact.safetensors")
    cache = tmp_path / "hub"
    install_in_hub_cache(repo, cache, "someone/compact-sr")
    x4 = sf.save(sf.build("esrgan", scale=4, seed=1), tmp_path / "RealESRGAN_x4plus.pth")
    s3_client.put_object(Bucket=s3_bucket, Key="models/RealESRGAN_x4plus.pth", Body=x4.read_bytes())
    s3_uri = f"s3://{s3_bucket}/models/RealESRGAN_x4plus.pth"

    isolated = redis_url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(isolated, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    decoder = f"spandrel:{HUB_FILE},{s3_uri}"
    files = good_images(4)
    for rel, data in files.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(data)

    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "rules", "decoder": decoder}).start()
    jobs = {scale: (tmp_path / f"out{scale}", f"sp{scale}-" + uuid.uuid4().hex[:6]) for scale in (2, 4)}
    try:  # both jobs at once, each waited for by its own submit
        submits = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pixelrelay",
                    "submit",
                    str(tmp_path / "in"),
                    "--out",
                    str(out),
                    "--job-id",
                    job_id,
                    "--task",
                    "upscale",
                    "--scale",
                    str(scale),
                    "--wait",
                ],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for scale, (out, job_id) in jobs.items()
        ]
        for proc in submits:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err + pool.logs()
    finally:
        pool.stop()
    cached = list((tmp_path / "hf-home" / "pixelrelay-checkpoints").glob("*RealESRGAN_x4plus.pth"))
    assert len(cached) == 1 and cached[0].read_bytes() == x4.read_bytes()  # the worker fetched it once
    used = {2: f"spandrel: {HUB_FILE} (Compact x2, SR, classical)", 4: f"spandrel: {s3_uri} (ESRGAN x4, SR, realworld)"}
    for scale, (out, job_id) in jobs.items():
        rows = _manifest(out, job_id)
        assert len(rows) == len(files)
        for row in rows:
            assert row["status"] == "done", row["error"]
            assert used[scale] in row["notes"], row["notes"]
            identity = row["models"]["decoder"]
            assert identity.startswith(f"spandrel:{HUB_FILE}=sha256:") and f",{s3_uri}=sha256:" in identity
            source = Image.open(tmp_path / "in" / row["input"].split("/in/", 1)[1])
            assert Image.open(row["output"]).size == (scale * source.width, scale * source.height)
