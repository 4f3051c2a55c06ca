"""Throughput of the Hugging Face stage backends (items/s per stage and batch size).

    python benchmarks/bench_hf_stages.py [--batches 1,4,16] [--repeat 2] [--cpu-only]

CPU: the tiny random models of the tests (tests/pipeline/hf_fixtures.py). With CUDA, also
real-size random-weight configs (no download): Swin2SR-x4 (classical, embed 180, 6x6 layers)
on 512x512 inputs, a Qwen2.5-0.5B-size planner, a BLIP-base-size captioner; peak GPU
memory is reported per stage and batch. Every model is saved with save_pretrained and
loaded through the backends' own code path, exactly like a hub checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelrelay.pipeline.imageio import DecodedImage  # noqa: E402
from pixelrelay.pipeline.messages import Description, JobOptions, Plan  # noqa: E402
from tests.pipeline import hf_fixtures as fx  # noqa: E402


def _images(n: int, size: int, seed: int = 0) -> list[DecodedImage]:
    rng = np.random.default_rng(seed)
    return [DecodedImage(rgb=rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _descriptions(n: int) -> tuple[list[Description], list[JobOptions]]:
    d = Description(
        text="50x40 image, noisy (sigma 12), slightly soft",
        metrics={"noise_sigma": 12.0},
        noise_sigma=12.0,
        caption="a cat sitting on a sofa",
    )
    return [d] * n, [JobOptions(task="upscale", instruction="gentle denoise")] * n


def _time(fn, n_items: int, device: str, repeat: int) -> tuple[float, float | None]:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return n_items / best, peak


def bench(
    label: str, folders: dict[str, Path], device: str, batches: list[int], repeat: int, image_size: int, sr_tile: int
) -> list[tuple]:
    from pixelrelay.pipeline.stages.decoders.hf_sr import HFSuperResolutionDecoder
    from pixelrelay.pipeline.stages.decoders.learned import TileConfig
    from pixelrelay.pipeline.stages.encoders.hf_caption import HFCaptionEncoder
    from pixelrelay.pipeline.stages.planners.hf_llm import HFLLMPlanner

    rows = []
    enc = HFCaptionEncoder(str(folders["caption"]), device=device, batch_size=max(batches))
    for b in batches:
        ims = _images(b, image_size)
        rate, peak = _time(partial(enc.caption, ims), b, device, repeat)
        rows.append((label, "encoder hf-caption", b, rate, peak))
    del enc
    planner = HFLLMPlanner(str(folders["llm"]), device=device, batch_size=max(batches))
    for b in batches:
        descs, opts = _descriptions(b)
        rate, peak = _time(partial(planner.plan, descs, opts), b, device, repeat)
        rows.append((label, "planner hf-llm", b, rate, peak))
    del planner
    dec = HFSuperResolutionDecoder(
        str(folders["sr"]), device=device, tiles=TileConfig(tile=sr_tile, tile_batch=max(batches))
    )
    for b in batches:
        ims = _images(b, image_size, seed=1)
        plans = [Plan(scale=dec.models[0].upscale)] * b
        rate, peak = _time(partial(dec.restore, ims, plans), b, device, repeat)
        rows.append((label, f"decoder hf-sr x{dec.models[0].upscale} @{image_size}px", b, rate, peak))
    del dec
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def build_tiny(root: Path) -> dict[str, Path]:
    return {
        "caption": fx.make_tiny_blip(root / "blip"),
        "llm": fx.make_tiny_qwen2(root / "qwen"),
        "sr": fx.make_tiny_swin2sr(root / "sr", upscale=2),
    }


def build_real_size(root: Path) -> dict[str, Path]:
    """Random weights, real architectures and sizes (no download)."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        Qwen2Config,
        Qwen2ForCausalLM,
        Swin2SRConfig,
        Swin2SRForImageSuperResolution,
        Swin2SRImageProcessor,
    )

    torch.manual_seed(0)
    sr = Swin2SRForImageSuperResolution(
        Swin2SRConfig(
            embed_dim=180,
            depths=[6] * 6,
            num_heads=[6] * 6,
            window_size=8,
            upscale=4,
            img_range=1.0,
            upsampler="pixelshuffle",
            resi_connection="1conv",
            image_size=64,
        )
    )
    sr.save_pretrained(root / "swin2sr-x4")
    Swin2SRImageProcessor(size_divisor=8).save_pretrained(root / "swin2sr-x4")
    del sr

    tok = fx.make_qwen2_tokenizer()
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    llm.save_pretrained(root / "qwen-0.5b")
    tok.save_pretrained(root / "qwen-0.5b")
    del llm

    import shutil

    vocab_dir = Path(tempfile.mkdtemp())
    btok = fx.make_blip_tokenizer(vocab_dir)
    shutil.rmtree(vocab_dir, ignore_errors=True)
    cfg = BlipConfig()  # BLIP-base sizes (ViT-B/16 at 384, BERT-base decoder)
    cfg.text_config.bos_token_id = btok.convert_tokens_to_ids("[DEC]")
    cfg.text_config.sep_token_id = btok.sep_token_id
    cfg.text_config.pad_token_id = btok.pad_token_id
    blip = BlipForConditionalGeneration(cfg)
    blip.save_pretrained(root / "blip-base")
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=btok).save_pretrained(root / "blip-base")
    del blip
    return {"caption": root / "blip-base", "llm": root / "qwen-0.5b", "sr": root / "swin2sr-x4"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--cpu-batches", default="1,4")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny(root / "tiny")
        rows += bench("cpu tiny", tiny, "cpu", [int(b) for b in args.cpu_batches.split(",")], args.repeat, 64, 64)
        if torch.cuda.is_available() and not args.cpu_only:
            real = build_real_size(root / "real")
            rows += bench(
                "cuda real-size", real, "cuda", [int(b) for b in args.batches.split(",")], args.repeat, 512, 256
            )
    print(f"{'setup':<16} {'stage':<30} {'batch':>5} {'items/s':>10} {'peak GPU MiB':>13}")
    for label, stage, b, rate, peak in rows:
        print(f"{label:<16} {stage:<30} {b:>5} {rate:>10.2f} {'-' if peak is None else f'{peak:.0f}':>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
