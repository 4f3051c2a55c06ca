"""`pixelrelay bench quality` and `pixelrelay train encoder|decoder` run end to end through the
real command line on a handful of tiny generated images, in a few seconds."""

from __future__ import annotations

import json
import math

import pytest

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline import nets
from tests.conftest import run_cli, worker_env
from tests.training.helpers import TINY, write_images

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    write_images(root / "set", 6)  # 5 training files, 1 validation file
    return root


def test_bench_quality_runs_on_tiny_images(data_dir, tmp_path):
    figures_path = tmp_path / "figures.json"
    result = run_cli(
        [
            "bench",
            "quality",
            "--data",
            str(data_dir),
            "--split",
            "all",
            "--limit",
            "2",
            "--scale",
            "2",
            "--degradation",
            "bicubic",
            "--no-speed",
            "--threads",
            "1",
            "--json",
            str(figures_path),
        ],
        worker_env(""),
        timeout=120,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    assert "2 all images" in result.stdout and "bicubic x2 (2 images)" in result.stdout
    figures = json.loads(figures_path.read_text())
    assert set(figures) == {"bicubic_x2", "encoder"}
    for pipeline in ("bicubic", "classic", "builtin"):
        psnr, ssim = figures["bicubic_x2"][pipeline]
        assert math.isfinite(psnr) and psnr > 10 and 0 < ssim <= 1
    assert all(math.isfinite(v) for v in figures["encoder"].values())


def test_bench_quality_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["bench", "quality", "--data", str(tmp_path / "empty"), "--no-speed"], worker_env(""), timeout=120)
    assert result.returncode == ExitCode.USAGE and "no images under" in result.stderr


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_train_runs_a_few_steps(kind, data_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TINY[kind], steps=2, val_every=2, log_every=1)))
    out = tmp_path / f"{kind}.safetensors"
    result = run_cli(
        ["train", kind, "--data", str(data_dir), "--out", str(out), "--config", str(config), "--quiet"],
        worker_env(""),
        timeout=120,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    _, meta = nets.load_model(str(out), kind=kind)
    assert meta["kind"] == kind and json.loads(meta["step"]) == 2
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["event"] == "done"
