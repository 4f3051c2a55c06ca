"""`pixelrelay models list|pull` (pipeline.models_cli.main), offline."""

from __future__ import annotations

import pytest

from pixelrelay.exitcodes import ExitCode
from pixelrelay.producer import models_cli
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_swin2sr, tiny_model


@pytest.fixture(scope="session")
def sr_x2(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_swin2sr, "swin2SR-classical-sr-x2", upscale=2)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for stage in ("ENCODER", "PLANNER", "DECODER"):
        monkeypatch.delenv(f"PIXELRELAY_{stage}", raising=False)
    return cache


def test_list_shows_backends_and_presence(offline_cache, sr_x2, capsys):
    install_in_hub_cache(sr_x2, offline_cache, "caidas/swin2SR-classical-sr-x2-64")
    rc = models_cli.main(["list", "--decoder", f"hf-sr:caidas/swin2SR-classical-sr-x2-64,{sr_x2}", "--check"])
    out = capsys.readouterr().out
    assert rc == 0
    for kind in (
        "analysis",
        "hf-caption",
        "rules",
        "hf-llm",
        "classic",
        "hf-sr*",
        "sd-upscale",
        "sd-img2img",
        "instruct-pix2pix",
    ):
        assert kind in out
    lines = {line.split()[2]: line for line in out.splitlines() if line.startswith("decoder  hf-sr")}
    assert "present" in lines["caidas/swin2SR-classical-sr-x2-64"] and "configured" in lines[str(sr_x2)]
    assert "missing" in next(line for line in out.splitlines() if "Qwen/Qwen2.5-0.5B-Instruct" in line)


def test_list_check_fails_when_configured_model_missing(offline_cache, capsys, monkeypatch):
    monkeypatch.setenv("PIXELRELAY_PLANNER", "hf-llm")
    assert models_cli.main(["list", "--check"]) == ExitCode.MODELS_MISSING
    out = capsys.readouterr().out
    assert "planner=hf-llm" in out and "missing: planner hf-llm:Qwen/Qwen2.5-0.5B-Instruct" in out
    assert models_cli.main(["list"]) == 0  # without --check it only reports


def test_pull(offline_cache, sr_x2, capsys):
    assert models_cli.main(["pull", f"hf-sr:{sr_x2}", "rules"]) == 0
    out = capsys.readouterr().out
    assert "present" in out and "nothing to pull" in out
    # offline and not cached: a clear refusal, no network
    assert models_cli.main(["pull", "hf-llm"]) == ExitCode.MODELS_MISSING
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err
    assert models_cli.main(["pull", "no-such-backend"]) == 2
    # once in the cache, pull is a no-op that says where it is
    install_in_hub_cache(sr_x2, offline_cache, "caidas/swin2SR-classical-sr-x4-64")
    assert models_cli.main(["pull", "hf-sr:caidas/swin2SR-classical-sr-x4-64"]) == 0
    assert str(offline_cache) in capsys.readouterr().out


@pytest.mark.e2e
def test_list_reads_backend_classes_without_importing_torch(offline_cache):
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys; from pixelrelay.producer.models_cli import main; rc = main(['list']); "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stabilityai/stable-diffusion-x4-upscaler" in result.stdout  # sd-upscale's own default_model
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stdout  # sd-img2img's
    assert "timbrooks/instruct-pix2pix" in result.stdout  # instruct-pix2pix's


def test_pulling_a_diffusers_pipeline_fetches_its_folders_not_the_whole_repo(offline_cache, monkeypatch, capsys):
    """``sd-upscale`` (like the generative decoders) asks the hub for the pipeline's
    component folders, without the fp16 copies, non-EMA weights and single-file checkpoint
    its repository also holds. The hub cannot be reached here: the download call is
    recorded, not made."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def snapshot_download(repo, **kwargs):
        if kwargs.get("local_files_only"):  # the presence check: not in the (empty) cache
            raise LocalEntryNotFoundError(f"{repo} is not cached")
        asked.append((repo, kwargs))
        return str(offline_cache / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert models_cli.main(["pull", "sd-upscale", "sd-img2img"]) == 0
    assert [repo for repo, _ in asked] == [
        "stabilityai/stable-diffusion-x4-upscaler",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ]
    for _, kwargs in asked:
        assert "*/*.safetensors" in kwargs["allow_patterns"] and "*.safetensors" not in kwargs["allow_patterns"]
        assert {"*.fp16.safetensors", "*.ckpt"} <= set(kwargs["ignore_patterns"])
