"""The builtin networks' weights files: float16 storage round-trips, and the shipped set fits."""

from pathlib import Path

import torch

from pixelrelay.pipeline import nets

WEIGHTS = Path(nets.__file__).with_name("weights")


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    net = nets.RestoreNet(channels=8, blocks=1, hidden=8, context_channels=[8], context_blocks=[1])
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    nets.save_model(net, "decoder", str(tmp_path / "f32.safetensors"))
    nets.save_model(net, "decoder", str(tmp_path / "f16.safetensors"), dtype="float16")
    size32, size16 = ((tmp_path / f).stat().st_size for f in ("f32.safetensors", "f16.safetensors"))
    assert size16 < 0.6 * size32
    loaded, meta = nets.load_model(str(tmp_path / "f16.safetensors"), kind="decoder")
    assert meta["stored_dtype"] == "float16" and all(p.dtype == torch.float32 for p in loaded.parameters())
    x, c = torch.rand(1, 3, 20, 20), torch.rand(1, nets.COND_DIM)
    with torch.no_grad():
        assert (loaded(x, c, 2) - net.eval()(x, c, 2)).abs().max() < 2e-3


def test_shipped_weights_fit_the_5_mb_budget():
    files = sorted(WEIGHTS.glob("*.safetensors"))
    assert {f.name for f in files} >= {
        "builtin_encoder.safetensors",
        "builtin_upscaler.safetensors",
        "builtin_restorer.safetensors",
    }
    assert sum(f.stat().st_size for f in files) <= 5 * 1000 * 1000
