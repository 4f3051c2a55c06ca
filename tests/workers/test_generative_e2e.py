"""Style jobs through real stage workers with the generative decoders: tiny random diffusers
pipelines (a Stable Diffusion text-to-image repo, loaded for img2img, and an InstructPix2Pix
one) and the tiny LLM planner, laid out in a hub cache under the real default hub ids and
loaded with HF_HUB_OFFLINE=1, through the same path as a download. The plans carry a
generative edit (the tiny LLM asks for one), the seed comes from the instruction, so two
identical images give identical outputs; alpha is kept; the outputs are the scale's size;
the manifest names the model, the working size and the grading applied after the edit."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import redis
from PIL import Image

from tests.conftest import WorkerPool, run_cli, worker_env
from tests.images import encode, photo_like
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_instruct_pix2pix, make_tiny_qwen2, make_tiny_sd

pytestmark = pytest.mark.e2e

pytest.importorskip("diffusers", reason="the generative decoders need the diffusers extra")

HUB_IDS = {
    "hf-llm": "Qwen/Qwen2.5-0.5B-Instruct",
    "sd-img2img": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "instruct-pix2pix": "timbrooks/instruct-pix2pix",
}
INSTRUCTION = "in the style of a watercolour painting"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    built = tmp_path_factory.mktemp("tiny-gen")
    cache = tmp_path_factory.mktemp("hub-cache-gen")
    install_in_hub_cache(make_tiny_qwen2(built / "qwen"), cache, HUB_IDS["hf-llm"])
    install_in_hub_cache(make_tiny_sd(built / "sd"), cache, HUB_IDS["sd-img2img"])
    install_in_hub_cache(make_tiny_instruct_pix2pix(built / "p2p"), cache, HUB_IDS["instruct-pix2pix"])
    return cache


def _files(root) -> dict[str, Image.Image]:
    same = photo_like(40, 32, 1)
    rgba = photo_like(36, 28, 2).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 36, dtype=np.uint8), (28, 1))))
    files = {"a.png": same, "b.png": same, "alpha.png": rgba}
    (root / "in").mkdir()
    for name, image in files.items():
        (root / "in" / name).write_bytes(encode(image, "PNG"))
    return files


def test_style_jobs_through_the_generative_decoders(hub_cache, redis_url, tmp_path):
    isolated = redis_url.rsplit("/", 1)[0] + "/10"
    redis.Redis.from_url(isolated).flushdb()
    env = worker_env(
        isolated, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", PIXELRELAY_ALLOWED_BACKENDS="instruct-pix2pix"
    )
    files = _files(tmp_path)
    pool = WorkerPool(env, tmp_path, {"encoder": "analysis", "planner": "hf-llm", "decoder": "sd-img2img"}).start()
    jobs = {"sd-img2img": 1, "instruct-pix2pix": 2}  # decoder -> scale
    ids = {}
    try:
        for decoder, scale in jobs.items():
            ids[decoder] = f"gen-{decoder}-{uuid.uuid4().hex[:6]}"
            result = run_cli(
                [
                    "submit",
                    str(tmp_path / "in"),
                    "--out",
                    str(tmp_path / decoder),
                    "--job-id",
                    ids[decoder],
                    "--task",
                    "style",
                    "--instruction",
                    INSTRUCTION,
                    "--planner",
                    "hf-llm",
                    "--decoder",
                    decoder,
                    "--scale",
                    str(scale),
                    "--wait",
                ],
                env,
                timeout=400,
            )
            assert result.returncode == 0, result.stdout + result.stderr + pool.logs()
    finally:
        pool.stop()
    for decoder, scale in jobs.items():
        manifest = tmp_path / decoder / "_jobs" / ids[decoder] / "manifest.jsonl"
        rows = {r["input"].rsplit("/", 1)[1]: r for r in map(json.loads, manifest.read_text().splitlines())}
        assert set(rows) == set(files)
        outputs = {}
        for name, row in rows.items():
            assert row["status"] == "done", row["error"]
            assert row["backends"]["decoder"] == decoder and row["backends"]["planner"] == "hf-llm"
            generative = row["plan"]["edit"]["generative"]
            assert generative is not None and generative["seed"] > 0
            notes = " | ".join(row["notes"])
            assert f"{decoder}: {HUB_IDS[decoder]}, edit at" in notes and f"seed {generative['seed']}" in notes
            assert "graded: " in notes  # the plan's grading ran on the edited image
            assert row["models"]["decoder"].startswith(f"{HUB_IDS[decoder]}@{'0' * 40};native=32;")
            source, out = files[name], Image.open(row["output"])
            assert out.size == (scale * source.width, scale * source.height)
            outputs[name] = np.asarray(out)
            if name == "alpha.png":
                assert out.mode == "RGBA"
                expected = np.asarray(source)[..., 3]
                if scale == 1:
                    assert np.array_equal(outputs[name][..., 3], expected)
                else:
                    assert abs(float(outputs[name][..., 3].mean()) - float(expected.mean())) < 4
        assert np.array_equal(outputs["a.png"], outputs["b.png"])  # same image, same seed: same output
        source = np.asarray(files["a.png"].resize(Image.open(rows["a.png"]["output"]).size))
        assert np.abs(outputs["a.png"].astype(float)[..., :3] - source[..., :3]).mean() > 3  # it was edited
