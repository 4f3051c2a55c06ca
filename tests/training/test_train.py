"""A tiny few-step training run writes loadable safetensors and a log; the split is fixed."""

import json

import numpy as np
import pytest

from pixelrelay.pipeline import nets
from pixelrelay.training import data, train
from tests.training.helpers import TINY, write_images


def test_split_every_fifth_file_per_folder(tmp_path):
    write_images(tmp_path / "a", 11)
    write_images(tmp_path / "b", 5)
    tr, va = data.split(tmp_path)
    assert [p.name for p in va] == ["img_04.png", "img_09.png", "img_04.png"]
    assert [p.parent.name for p in va] == ["a", "a", "b"]
    assert len(tr) == 13 and not set(tr) & set(va)


def test_shipped_configs_are_valid():
    for kind in ("encoder", "decoder"):
        cfg = train.load_config(kind, None)
        assert cfg["steps"] > 0 and "seed" in cfg
        nets.build(kind, cfg["net"])
    for path in sorted(train.CONFIG_DIR.glob("decoder_*.json")):  # warm restarts from --init
        cfg = train.load_config("decoder", str(path))
        assert cfg["steps"] > 0 and "seed" in cfg and "init" not in cfg, path.name
        nets.build("decoder", {"channels": 8, "blocks": 1, "hidden": 8, **cfg.get("grow", {})})


def test_grow_keeps_the_function_and_adds_the_context_branch(tmp_path):
    import torch

    torch.manual_seed(0)
    small = nets.RestoreNet(channels=8, blocks=2, hidden=8)
    for p in small.parameters():  # non-zero heads, so the output depends on every weight
        torch.nn.init.normal_(p, std=0.05)
    nets.save_model(small, "decoder", str(tmp_path / "small.safetensors"))
    cfg = {
        "init": str(tmp_path / "small.safetensors"),
        "grow": {"context_channels": [8, 16], "context_blocks": [1, 1], "context_after": 1},
    }
    grown = train.build_net("decoder", cfg).eval()
    assert cfg["net"]["context_channels"] == [8, 16] and grown.context is not None
    x, cond = torch.rand(2, 3, 18, 22), torch.rand(2, nets.COND_DIM)
    with torch.no_grad():
        for scale in (1, 2, 4):
            xs = x[..., :18, :20] if scale == 1 else x
            assert torch.allclose(grown(xs, cond, scale), small.eval()(xs, cond, scale), atol=1e-6)
        # Once the branch's last conv is non-zero, it changes the output, at odd sizes too.
        torch.nn.init.normal_(grown.context.ups[0].weight, std=0.05)
        y = grown(x, cond, 2)
    assert y.shape == (2, 3, 36, 44) and not torch.allclose(y, small(x, cond, 2), atol=1e-4)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_tiny_training_run(tmp_path, kind):
    write_images(tmp_path / "data" / "set", 6)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(TINY[kind]))
    out = tmp_path / "out" / f"{kind}.safetensors"
    log = tmp_path / "log.jsonl"
    rc = train.main(
        [
            kind,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--config",
            str(cfg_path),
            "--log",
            str(log),
            "--quiet",
        ]
    )
    assert rc == 0
    net, meta = nets.load_model(str(out), kind=kind)
    assert meta["kind"] == kind and json.loads(meta["step"]) == 4
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["event"] == "config" and records[0]["train_files"] == 5
    assert records[-1]["event"] == "done"
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    vals = [r for r in records if r.get("event") == "val"]
    assert [v["step"] for v in vals] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_training_is_reproducible(tmp_path):
    write_images(tmp_path / "data" / "set", 6)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(dict(TINY["decoder"], steps=2, val_every=2)))
    losses = []
    for run in ("a", "b"):
        log = tmp_path / f"{run}.jsonl"
        train.main(
            [
                "decoder",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / f"{run}.safetensors"),
                "--config",
                str(cfg_path),
                "--log",
                str(log),
                "--quiet",
            ]
        )
        losses.append([json.loads(line).get("loss") for line in log.read_text().splitlines()])
    assert losses[0] == losses[1]


def test_second_stage_starts_from_init_weights(tmp_path):
    write_images(tmp_path / "data" / "set", 6)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(dict(TINY["decoder"], steps=2, val_every=2)))
    first, second = tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"
    args = ["decoder", "--data", str(tmp_path / "data"), "--config", str(cfg_path), "--quiet"]
    train.main(args + ["--out", str(first)])
    # A stage-2 config without "net": the architecture comes from the init file.
    cfg2 = dict(TINY["decoder"], steps=2, val_every=2, lr=0.0)
    cfg2.pop("net")
    cfg_path.write_text(json.dumps(cfg2))
    train.main(args + ["--out", str(second), "--init", str(first)])
    a, _ = nets.load_model(str(first))
    b, _ = nets.load_model(str(second))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and np.allclose(va.numpy(), vb.numpy(), atol=1e-6)  # lr 0: unchanged


def test_bfloat16_autocast_trains_in_float32_weights(tmp_path):
    import torch

    write_images(tmp_path / "data" / "set", 6)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(dict(TINY["decoder"], steps=2, val_every=2, autocast="bfloat16")))
    out = tmp_path / "bf16.safetensors"
    assert (
        train.main(
            [
                "decoder",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(out),
                "--config",
                str(cfg_path),
                "--log",
                str(tmp_path / "log.jsonl"),
                "--quiet",
            ]
        )
        == 0
    )
    net, _ = nets.load_model(str(out))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # The convolutions really run in bfloat16 inside the context, and in float32 outside it.
    x = torch.rand(1, 3, 8, 8)
    with train.autocast({"autocast": "bfloat16"}):
        assert net.inputs["x2"](x).dtype == torch.bfloat16
    with train.autocast({}):
        assert net.inputs["x2"](x).dtype == torch.float32
    with pytest.raises(ValueError, match="autocast"):
        train.autocast({"autocast": "fp8"})


def test_pipeline_condition_reads_the_degraded_region_like_the_deployed_path(tmp_path):
    from pixelrelay.training import degradations as D

    write_images(tmp_path / "set", 2, size=(200, 200))
    imgs = data.load_images(sorted((tmp_path / "set").iterdir()))
    condition = train.PipelineCondition()
    cfg = {"lr_patch": 24, "cond_context": 96}
    noisy = D.DegradationConfig(p_blur=0, p_noise=1, noise_sigma=(30.0, 30.0), p_poisson=0, p_jpeg=0)
    lr, hr, cond = train.decoder_sample(imgs, 2, cfg, noisy, np.random.default_rng(0), condition)
    assert lr.shape == (24, 24, 3) and hr.shape == (48, 48, 3)
    # Heavy noise: the plan denoises, and the condition carries a noise level near 30.
    assert 15 / 50 < cond[0] < 45 / 50 and cond[2] == 0.0
    # The patch is the low-res view of its high-res target (aligned, not shifted).
    down = np.asarray(D.to_uint8(D.downscale(D.to_tensor(hr), 2, "bicubic")))
    shifted = np.asarray(D.to_uint8(D.downscale(D.to_tensor(np.roll(hr, 8, axis=1)), 2, "bicubic")))
    assert D.psnr_y(lr, down) > D.psnr_y(lr, shifted) + 3
    # A region whose plan has no operation (the upscaler's) is redrawn, then given up on.
    calls = []
    *_, cond = train.decoder_sample(
        imgs, 1, cfg, noisy, np.random.default_rng(0), lambda lr, scale: calls.append(lr.shape)
    )
    assert cond == nets.cond_vector(0.0, 0.0, None)
    assert calls == [(96, 96, 3)] * train.MAX_CONDITION_REDRAWS


def test_tiny_training_run_with_pipeline_conditions(tmp_path):
    write_images(tmp_path / "data" / "set", 6)
    cfg = dict(
        TINY["decoder"], steps=2, val_every=2, cond_source="pipeline", cond_context=32, p_clean={"1": 0, "2": 0, "4": 0}
    )
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    args = [
        "decoder",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "o.safetensors"),
        "--config",
        str(cfg_path),
        "--quiet",
    ]
    assert train.main(args) == 0
    cfg_path.write_text(json.dumps(dict(cfg, cond_source="estimates")))
    with pytest.raises(ValueError, match="cond_source"):
        train.main(args)


def test_overshoot_penalty_is_zero_in_range_and_grows_with_a_halo():
    import torch

    target = torch.zeros(1, 3, 16, 16)
    target[..., 8:] = 0.8
    assert train.overshoot_penalty(target, target).item() == 0.0
    blurred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    assert train.overshoot_penalty(blurred, target).item() < 1e-6  # a soft edge is not a halo
    halo = target.clone()
    halo[..., 8:10] = 1.0  # a bright line along the edge, beyond the local maximum
    halo[..., 6:8] = -0.1  # and a dark one on the other side
    small = train.overshoot_penalty(halo, target).item()
    halo[..., 8:10] = 1.2
    assert 0 < small < train.overshoot_penalty(halo, target).item()


def test_the_edge_only_overshoot_penalty_counts_halos_at_edges_not_texture_elsewhere():
    import torch

    target = torch.full((2, 3, 32, 32), 0.5)
    target[..., 16:] = 0.9  # a strong vertical edge at column 16
    target[..., 2:8, 2:10] += 0.02 * torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    textured = target.clone()
    textured[..., 3:7, 3:9] += 0.05  # overshoot in the faint texture, far from the edge
    assert train.overshoot_penalty(textured, target).item() > 0
    assert train.overshoot_penalty(textured, target, edges_only=True).item() == 0.0
    halo = target.clone()
    halo[..., 16:18] = 1.0  # a halo along the edge
    edge = train.overshoot_penalty(halo, target, edges_only=True).item()
    assert edge > 0 and edge > train.overshoot_penalty(halo, target).item()  # averaged near edges only
    mask = train.strong_edges(target, 2, 0.9, 20 / 255)
    assert mask[..., 14:18].all() and not mask[..., :, :10].any()


def test_the_mild_mix_and_the_overshoot_term_train(tmp_path):
    import numpy as np

    from pixelrelay.training import degradations as D

    assert train.pick_degradation({}, D.DegradationConfig(), np.random.default_rng(0)) == D.DegradationConfig()
    rng = np.random.default_rng(0)
    picks = [train.pick_degradation({"p_mild": 0.5}, D.DegradationConfig(), rng) is D.MILD for _ in range(200)]
    assert 60 < sum(picks) < 140
    write_images(tmp_path / "data" / "set", 6)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(dict(TINY["decoder"], steps=2, val_every=2, p_mild=0.5, overshoot_weight=1.0)))
    out = tmp_path / "m.safetensors"
    assert (
        train.main(
            ["decoder", "--data", str(tmp_path / "data"), "--out", str(out), "--config", str(cfg_path), "--quiet"]
        )
        == 0
    )
    assert out.exists()
