"""The decode stage writes outputs with the job's quality options and the right
Content-Type (``workers.outputs._write_output``, through real local and S3 storage)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import ItemRecord, JobOptions, Plan
from pixelrelay.pipeline.stages.base import RestoredImage
from pixelrelay.pipeline.storage import open_storage
from tests.conftest import TEST_SIGNER

RT = SimpleNamespace(storage=open_storage, signer=TEST_SIGNER)  # the Runtime members _write_output uses


@pytest.fixture(scope="module")
def write_output(redis_url):
    """``workers.outputs`` builds its Celery app on import, which needs a broker URL."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELRELAY_REDIS_URL", redis_url)
        from pixelrelay.workers.outputs import _write_output

    return _write_output


def _image() -> np.ndarray:
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 5) for c in range(3)], -1)
    return np.clip(rgb + np.random.default_rng(0).normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)


def _write(write_output, output: str, fmt: str, options: JobOptions | None) -> ItemRecord:
    rgb = _image()
    record = ItemRecord(index=0, input="unused", output=output, plan=Plan(scale=1, output_format=fmt))
    write_output(RT, record, DecodedImage(rgb=rgb), RestoredImage(rgb=rgb), options)
    assert record.status == "done"
    return record


def test_quality_options_reach_the_written_files(write_output, tmp_path):
    sizes = {}
    for fmt in ("jpg", "webp"):
        for quality in (15, 92):
            out = tmp_path / f"q{quality}.{fmt}"
            _write(write_output, str(out), fmt, JobOptions(quality=quality))
            sizes[fmt, quality] = out.stat().st_size
        assert sizes[fmt, 15] < sizes[fmt, 92]
    _write(write_output, str(tmp_path / "lossless.webp"), "webp", JobOptions(lossless=True, quality=15))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "lossless.webp").convert("RGB")), _image())
    _write(write_output, str(tmp_path / "default.jpg"), "jpg", None)  # no options: the defaults (quality 92)
    assert (tmp_path / "default.jpg").stat().st_size == sizes["jpg", 92]


def test_s3_outputs_are_typed_as_images(write_output, s3_bucket, s3_client):
    for fmt, content_type in (("png", "image/png"), ("jpg", "image/jpeg"), ("webp", "image/webp")):
        _write(write_output, f"s3://{s3_bucket}/out/a.{fmt}", fmt, JobOptions())
        head = s3_client.head_object(Bucket=s3_bucket, Key=f"out/a.{fmt}")
        assert head["ContentType"] == content_type
        body = s3_client.get_object(Bucket=s3_bucket, Key=f"out/a.{fmt}")["Body"].read()
        assert Image.open(io.BytesIO(body)).size == (64, 48)
