"""``pixelrelay bench quality --data DIR [--scale 2|4] [--degradation bicubic|realistic|mild] [--encoder-model FILE]``

Measures restoration quality on DIR's validation part (``pixelrelay.training.data``;
``--split all`` for every file), degraded by ``pixelrelay.training.degradations``, for the
bicubic, classic and builtin pipelines and the bare network given the true degradation:
PSNR and SSIM on Y, edge overshoot, the encoder's estimates against the true parameters and
the decoder's speed, checked against the floors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import JobOptions, Scale
from pixelrelay.training import data
from pixelrelay.training import degradations as D

SEED = 2024


def _pipelines(device: str, builtin_model: str | None = None, encoder_model: str | None = None):
    from pixelrelay.pipeline.stages.decoders.builtin import BuiltinDecoder
    from pixelrelay.pipeline.stages.decoders.classic import ClassicDecoder
    from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder
    from pixelrelay.pipeline.stages.encoders.builtin import BuiltinEncoder
    from pixelrelay.pipeline.stages.planners.rules import RulesPlanner

    planner = RulesPlanner()
    return {
        "classic": (AnalysisEncoder(device=device), planner, ClassicDecoder(device=device)),
        "builtin": (
            BuiltinEncoder(model=encoder_model, device=device),
            planner,
            BuiltinDecoder(model=builtin_model, device=device),
        ),
    }


def run_pipeline(stages, lrs: Sequence[np.ndarray], scale: int, batch: int = 8):
    enc, planner, dec = stages
    outs, descs, plans = [], [], []
    for k in range(0, len(lrs), batch):
        ims = [DecodedImage(rgb=lr) for lr in lrs[k : k + batch]]
        d = enc.describe(ims)
        p = planner.plan(d, [JobOptions(task="upscale", scale=scale)] * len(ims))
        outs += [r.rgb for r in dec.restore(ims, p)]
        descs += d
        plans += p
    return outs, descs, plans


def make_set(hrs: list[np.ndarray], scale: int, degradation: str, seed: int = SEED):
    """[(hr, lr, params or None)] for the given degradation, seeded per image."""
    out: list[tuple[np.ndarray, np.ndarray, D.DegradationParams | None]] = []
    for i, hr in enumerate(hrs):
        if degradation == "bicubic":
            h, lr = D.bicubic_pair(hr, scale)
            out.append((h, lr, None))
        else:
            rng = np.random.default_rng(seed + 7919 * i + scale)
            if degradation == "mild":
                lr, p = D.degrade(hr, scale, rng, D.MILD)
            else:
                lr, p = D.degrade(hr, scale, rng, force=("blur", "noise", "jpeg"))
            out.append((D.crop_to_multiple(hr, scale), lr, p))
    return out


def overshoot(outs, hrs, scale) -> float:
    return float(np.mean([D.edge_overshoot(o, h, border=scale) for o, h in zip(outs, hrs, strict=True)]))


def score(outs, hrs, scale) -> tuple[float, float]:
    ps = [D.psnr_y(o, h, border=scale) for o, h in zip(outs, hrs, strict=True)]
    ss = [D.ssim_y(o, h, border=scale) for o, h in zip(outs, hrs, strict=True)]
    return float(np.mean(ps)), float(np.mean(ss))


@torch.inference_mode()
def bare_net(dec, lrs, params, scale) -> list[np.ndarray]:
    """The builtin decoder's network given the true degradation parameters (untiled, fp32
    on the CPU): what the pipeline would score with a perfect encoder."""
    from pixelrelay.pipeline.nets import cond_vector
    from pixelrelay.pipeline.stages.decoders.builtin import route

    outs = []
    for lr, p in zip(lrs, params, strict=True):
        c = cond_vector(p.noise_sigma, p.blur_sigma, p.jpeg_quality) if p is not None else cond_vector(0, 0, None)
        net = dec.nets[route(c)]
        outs.append(D.to_uint8(net(D.to_tensor(lr), torch.tensor([c]), scale).float()[0]))
    return outs


def evaluate(hrs, scale: int, degradation: str, pipes, log=print) -> dict[str, Any]:
    t0 = time.time()
    items = make_set(hrs, scale, degradation)
    gts, lrs, params = [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
    res: dict[str, Any] = {"scale": scale, "degradation": degradation, "images": len(items)}
    bic = [D.to_uint8(D.upscale_bicubic(D.to_tensor(lr), scale)) for lr in lrs]
    res["bicubic"] = score(bic, gts, scale)
    res["bicubic_overshoot"] = overshoot(bic, gts, scale)
    for name, stages in pipes.items():
        outs, descs, plans = run_pipeline(stages, lrs, scale)
        res[name] = score(outs, gts, scale)
        res[f"{name}_overshoot"] = overshoot(outs, gts, scale)
        res[f"{name}_ops"] = float(np.mean([len(p.operations) > 0 for p in plans]))
        res[f"{name}_ops_count"] = int(sum(len(p.operations) > 0 for p in plans))
        if name == "builtin":
            res["builtin_descs"] = descs
    if degradation == "realistic" or scale in (2, 4):
        dec = pipes["builtin"][2]
        res["builtin-net (true params)"] = score(bare_net(dec, lrs, params, scale), gts, scale)
    res["params"] = params
    res["seconds"] = time.time() - t0
    log(f"# {degradation} x{scale}: {len(items)} images in {res['seconds']:.0f}s")
    return res


# JPEG with something on top: an edited and re-saved JPEG, x1, the other step mild.
JPEG_THEN_NOISE = D.DegradationConfig(
    p_blur=0, p_noise=1, p_jpeg=1, p_jpeg_early=1, jpeg_quality=(10, 95), noise_sigma=(2.0, 15.0), p_poisson=0.0
)
JPEG_THEN_BLUR = D.DegradationConfig(
    p_blur=1, p_noise=0, p_jpeg=1, p_jpeg_early=1, jpeg_quality=(10, 95), blur_sigma=(0.3, 1.0)
)


def _quality_error(enc, lr: np.ndarray, true_quality: int | None) -> float:
    """How far the estimated JPEG quality is off (no JPEG reads as quality 100, either side)."""
    e = enc.estimate([DecodedImage(rgb=lr)])[0]["jpeg_quality"]
    return abs((100.0 if e is None else e) - (100.0 if true_quality is None else true_quality))


def encoder_errors(hrs, enc, seed: int = SEED) -> dict[str, Any]:
    """Estimation errors on noise-only (x1, Gaussian/Poisson sigma 0-50), JPEG-only (x1,
    quality 10-95) and blur-only (x1, sigma 0.3-2) versions of each image, and the JPEG
    quality when noise (sigma 2-15) or blur (sigma 0.3-1) follows the JPEG step."""
    noise_cfg = D.DegradationConfig(p_blur=0, p_noise=1, p_jpeg=0, noise_sigma=(0.0, 50.0))
    jpeg_cfg = D.DegradationConfig(p_blur=0, p_noise=0, p_jpeg=1, jpeg_quality=(10, 95))
    blur_cfg = D.DegradationConfig(p_blur=1, p_noise=0, p_jpeg=0, blur_sigma=(0.3, 2.0))
    n_true, n_est, q_true, q_est, b_true, b_est = [], [], [], [], [], []
    for i, hr in enumerate(hrs):
        rng = np.random.default_rng(seed + 31 * i)
        lr, p = D.degrade(hr, 1, rng, noise_cfg)
        n_true.append(p.noise_sigma)
        n_est.append(enc.estimate([DecodedImage(rgb=lr)])[0]["noise_sigma"])
        lr, p = D.degrade(hr, 1, rng, jpeg_cfg)
        q_true.append(p.jpeg_quality)
        e = enc.estimate([DecodedImage(rgb=lr)])[0]["jpeg_quality"]
        q_est.append(100.0 if e is None else e)
        lr, p = D.degrade(hr, 1, np.random.default_rng(seed + 37 * i), blur_cfg)
        b_true.append(p.blur_sigma)
        b_est.append(enc.estimate([DecodedImage(rgb=lr)])[0].get("blur_sigma") or 0.0)
    n_err = np.abs(np.array(n_est) - np.array(n_true))
    q_err = np.abs(np.array(q_est) - np.array(q_true, dtype=float))
    b_err = np.abs(np.array(b_est, dtype=float) - np.array(b_true))
    after: dict[str, list[float]] = {"noise": [], "blur": []}
    for i, hr in enumerate(hrs):
        for kind, cfg in (("noise", JPEG_THEN_NOISE), ("blur", JPEG_THEN_BLUR)):
            lr, p = D.degrade(hr, 1, np.random.default_rng(seed + 41 * i + len(kind)), cfg)
            after[kind].append(_quality_error(enc, lr, p.jpeg_quality))
    qn_err, qb_err = np.array(after["noise"]), np.array(after["blur"])
    return {
        "jpeg_then_noise_mae": float(qn_err.mean()),
        "jpeg_then_noise_within10": float((qn_err <= 10).mean()),
        "jpeg_then_blur_mae": float(qb_err.mean()),
        "jpeg_then_blur_within10": float((qb_err <= 10).mean()),
        "noise_only_mae": float(n_err.mean()),
        "noise_only_within3": float((n_err <= 3).mean()),
        "jpeg_only_mae": float(q_err.mean()),
        "jpeg_only_within10": float((q_err <= 10).mean()),
        "blur_only_mae": float(b_err.mean()),
        "blur_only_within05": float((b_err <= 0.5).mean()),
    }


def realistic_encoder_errors(res: dict[str, Any]) -> dict[str, float]:
    ests = res["builtin_descs"]
    params = res["params"]
    n_err = np.array([abs((d.noise_sigma or 0.0) - p.noise_sigma) for d, p in zip(ests, params, strict=True)])
    q_err = np.array(
        [
            abs((d.jpeg_quality if d.jpeg_quality is not None else 100.0) - p.jpeg_quality)
            for d, p in zip(ests, params, strict=True)
        ]
    )
    b_err = np.array([abs((d.blur_sigma or 0.0) - p.blur_sigma) for d, p in zip(ests, params, strict=True)])
    return {
        "noise_mae": float(n_err.mean()),
        "noise_within3": float((n_err <= 3).mean()),
        "jpeg_mae": float(q_err.mean()),
        "jpeg_within10": float((q_err <= 10).mean()),
        "blur_mae": float(b_err.mean()),
        "blur_within05": float((b_err <= 0.5).mean()),
    }


def clean_estimates(res: dict[str, Any]) -> dict[str, float]:
    ests = res["builtin_descs"]
    return {
        "clean_noise_mean": float(np.mean([d.noise_sigma or 0.0 for d in ests])),
        "clean_jpeg_flagged": float(np.mean([d.jpeg_quality is not None for d in ests])),
        "clean_with_ops": float(res["builtin_ops"]),
    }


def degraded_plan(scale: Scale):
    """A plan with operations: the builtin decoder runs its restorer (the slower network)."""
    from pixelrelay.pipeline.messages import Operation, Plan

    return Plan(
        scale=scale,
        noise_sigma=15.0,
        jpeg_quality=50.0,
        operations=[Operation(name="denoise", strength=0.6), Operation(name="deblock", strength=0.5)],
    )


def time_decoder(
    dec, batch: int = 8, out_size: int = 512, scale: Scale = 2, repeats: int = 2, degraded: bool = False
) -> float:
    """Best-of-``repeats`` seconds per output of ``dec.restore``.

    Args:
        dec: the builtin decoder.
        batch: images per call.
        out_size: the outputs' side in pixels.
        scale: the plan's scale.
        repeats: timed calls; the best counts.
        degraded: a plan with operations (the restorer) instead of a clean one (the upscaler).
    """
    from pixelrelay.pipeline.messages import Plan

    rng = np.random.default_rng(0)
    n = out_size // scale
    base = rng.integers(0, 256, (n // 8, n // 8, 3)).astype(np.uint8)
    img = np.asarray(D.to_uint8(D.upscale_bicubic(D.to_tensor(base), 8)))
    ims = [DecodedImage(rgb=img.copy()) for _ in range(batch)]
    plans = [degraded_plan(scale) if degraded else Plan(scale=scale)] * batch
    dec.restore(ims[:1], plans[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dec.restore(ims, plans)
        best = min(best, time.perf_counter() - t)
    return best / batch


def _fmt_row(name: str, ps: tuple[float, float], ref: tuple[float, float] | None = None) -> str:
    gain = f"{ps[0] - ref[0]:+6.2f}" if ref else "      "
    return f"  {name:28s} {ps[0]:7.2f} dB {ps[1]:7.4f}   {gain}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pixelrelay bench quality", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--scale", type=int, choices=(2, 4), default=None, help="default: 2 and 4")
    ap.add_argument(
        "--degradation",
        choices=("bicubic", "realistic", "mild"),
        default=None,
        help="default: bicubic x2, bicubic x4, realistic x2, mild x2",
    )
    ap.add_argument(
        "--split",
        choices=("val", "train", "all"),
        default="val",
        help="val: the validation part (report figures on it); train: the training part "
        "(tune hyperparameters on it, never on val); all: every file",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument(
        "--builtin-model",
        default=None,
        metavar="FILE|UPSCALER,RESTORER",
        help="score these builtin decoder weights instead of the shipped ones (candidates)",
    )
    ap.add_argument(
        "--encoder-model",
        default=None,
        metavar="FILE",
        help="score these builtin encoder weights instead of the shipped ones (a candidate)",
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return ap


def _files(args: argparse.Namespace) -> list[Path] | None:
    """The image files to score (``--split``, ``--limit``), or None (explained on stderr)."""
    parts = data.split_or_explain(args.data, "pixelrelay bench quality")
    if parts is None:
        return None
    train_files, val_files = parts
    files = {"val": val_files, "train": train_files, "all": sorted(train_files + val_files)}[args.split]
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(
            f"pixelrelay bench quality: no {args.split} images in {args.data} "
            "(every fifth file of a folder is validation; --split all uses every file)",
            file=sys.stderr,
        )
        return None
    return files


def _configs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (degradation, scale) pairs to score."""
    if args.degradation is None and args.scale is None:
        return [("bicubic", 2), ("bicubic", 4), ("realistic", 2), ("mild", 2)]
    degs = [args.degradation] if args.degradation else ["bicubic", "realistic", "mild"]
    scales = [args.scale] if args.scale else [2, 4]
    return [(d, s) for d in degs for s in scales]


def _config_lines(deg: str, scale: int, res: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """One degradation and scale's table, its figures added to ``figures``."""
    lines = [f"{deg} x{scale} ({res['images']} images)          PSNR-Y     SSIM-Y   vs bicubic"]
    lines.append(_fmt_row("bicubic", res["bicubic"]))
    lines.append(_fmt_row("classic (analysis/rules)", res["classic"], res["bicubic"]))
    lines.append(_fmt_row("builtin (builtin/rules)", res["builtin"], res["bicubic"]))
    if "builtin-net (true params)" in res:
        lines.append(_fmt_row("builtin-net (true params)", res["builtin-net (true params)"], res["bicubic"]))
    key = f"{deg}_x{scale}"
    figures[key] = {k: res[k] for k in ("bicubic", "classic", "builtin") if k in res}
    figures[key]["builtin_gain_over_bicubic_db"] = res["builtin"][0] - res["bicubic"][0]
    figures[key]["builtin_gain_over_classic_db"] = res["builtin"][0] - res["classic"][0]
    if "builtin-net (true params)" in res:
        figures[key]["builtin_net_true_params"] = res["builtin-net (true params)"]
    lines.append(
        f"  builtin - classic: {figures[key]['builtin_gain_over_classic_db']:+.2f} dB; "
        f"plans with operations: builtin {res['builtin_ops_count']}/{res['images']}, "
        f"classic {res['classic_ops_count']}/{res['images']}"
    )
    figures[key]["overshoot"] = {name: res[f"{name}_overshoot"] for name in ("bicubic", "classic", "builtin")}
    lines.append(
        "  edge overshoot (Y levels beyond the local range on strong edges): "
        + ", ".join(f"{name} {value:.2f}" for name, value in figures[key]["overshoot"].items())
    )
    lines.append(_estimate_line(deg, res, figures[key]))
    lines.append("")
    return lines


def _estimate_line(deg: str, res: dict[str, Any], figures: dict[str, Any]) -> str:
    """The encoder's estimates on one degradation's images (true parameters or clean)."""
    if deg != "bicubic":
        e = realistic_encoder_errors(res)
        figures["encoder"] = e
        return (
            f"  encoder on these: noise |err| {e['noise_mae']:.2f} (within 3: {e['noise_within3']:.0%}), "
            f"JPEG quality |err| {e['jpeg_mae']:.1f} (within 10: {e['jpeg_within10']:.0%}), "
            f"blur |err| {e['blur_mae']:.2f} (within 0.5: {e['blur_within05']:.0%})"
        )
    c = clean_estimates(res)
    figures["clean"] = c
    figures["clean_with_ops_count"] = res["builtin_ops_count"]
    return (
        f"  encoder on clean inputs: mean noise estimate {c['clean_noise_mean']:.2f}, "
        f"JPEG flagged {c['clean_jpeg_flagged']:.0%}, "
        f"plans with operations {res['builtin_ops_count']}/{res['images']}"
    )


def _encoder_lines(enc_err: dict[str, float]) -> list[str]:
    """The encoder's estimation errors, one degradation at a time."""
    return [
        "encoder estimation errors (x1, one degradation at a time)",
        f"  noise sigma 0-50 (Gaussian/Poisson): mean |err| {enc_err['noise_only_mae']:.2f}, "
        f"within +-3: {enc_err['noise_only_within3']:.0%}",
        f"  JPEG quality 10-95:                  mean |err| {enc_err['jpeg_only_mae']:.2f}, "
        f"within +-10: {enc_err['jpeg_only_within10']:.0%}",
        f"  blur sigma 0.3-2:                    mean |err| {enc_err['blur_only_mae']:.2f}, "
        f"within +-0.5: {enc_err['blur_only_within05']:.0%}",
        f"  JPEG quality, noise 2-15 after it:  mean |err| {enc_err['jpeg_then_noise_mae']:.2f}, "
        f"within +-10: {enc_err['jpeg_then_noise_within10']:.0%}",
        f"  JPEG quality, blur 0.3-1 after it:  mean |err| {enc_err['jpeg_then_blur_mae']:.2f}, "
        f"within +-10: {enc_err['jpeg_then_blur_within10']:.0%}",
    ]


def _speed_lines(dec, figures: dict[str, Any]) -> list[str]:
    """The builtin decoder timed on a clean and a degraded plan, into ``figures``."""
    clean_s, degraded_s = time_decoder(dec), time_decoder(dec, degraded=True)
    figures["seconds_per_512_output_clean"] = clean_s
    figures["seconds_per_512_output"] = max(clean_s, degraded_s)
    return [
        "",
        f"speed: builtin decoder x2, batch 8, 512x512 outputs, {torch.get_num_threads()} threads: "
        f"{clean_s:.3f} s per output on a clean plan (upscaler), {degraded_s:.3f} s on a "
        f"degraded one (restorer)",
    ]


def _floor_lines(figures: dict[str, Any], enc_err: dict[str, float], n_files: int) -> list[str]:
    """Each floor of the builtin models, PASS or MISS."""
    checks = []
    gains = (
        ("bicubic_x2", "x2 over bicubic >= 3.2 dB", "builtin_gain_over_bicubic_db", 3.2),
        ("bicubic_x4", "x4 over bicubic >= 1.5 dB", "builtin_gain_over_bicubic_db", 1.5),
        ("realistic_x2", "realistic x2 over classic >= 2 dB", "builtin_gain_over_classic_db", 2.0),
        ("mild_x2", "mild x2 over bicubic >= 1 dB", "builtin_gain_over_bicubic_db", 1.0),
    )
    for key, name, field, floor in gains:
        if key in figures:
            checks.append((name, figures[key][field], floor, True))
    for key in ("bicubic_x2", "bicubic_x4"):
        if key in figures:
            n = figures[key]["clean_with_ops_count"]
            checks.append((f"clean {key[-2:]}: no operation on >= 35/36", 1 - n / n_files, 35 / 36, True))
    checks.append(("noise sigma mean |err| <= 3", enc_err["noise_only_mae"], 3.0, False))
    checks.append(("noise sigma within 3 on >= 95%", enc_err["noise_only_within3"], 0.95, True))
    checks.append(("JPEG quality mean |err| <= 10", enc_err["jpeg_only_mae"], 10.0, False))
    checks.append(("JPEG quality within 10 on >= 90%", enc_err["jpeg_only_within10"], 0.90, True))
    checks.append(("JPEG q within 10, noise after, >= 90%", enc_err["jpeg_then_noise_within10"], 0.90, True))
    checks.append(("JPEG q within 10, blur after, >= 90%", enc_err["jpeg_then_blur_within10"], 0.90, True))
    checks.append(("blur sigma within 0.5 on >= 80%", enc_err["blur_only_within05"], 0.80, True))
    if "seconds_per_512_output" in figures:
        checks.append(("s per 512x512 output <= 0.5 (slower net)", figures["seconds_per_512_output"], 0.5, False))
    lines = ["", "floors"]
    for name, value, floor, higher in checks:
        ok = value >= floor if higher else value <= floor
        lines.append(f"  {'PASS' if ok else 'MISS'}  {name:36s} {value:8.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    files = _files(args)
    if files is None:
        return ExitCode.USAGE
    hrs = data.load_images(files)
    pipes = _pipelines(args.device, args.builtin_model, args.encoder_model)
    print(f"pixelrelay quality bench: {len(files)} {args.split} images from {args.data}")
    figures: dict[str, Any] = {}
    lines = []
    for deg, scale in _configs(args):
        lines += _config_lines(deg, scale, evaluate(hrs, scale, deg, pipes), figures)
    enc_err = encoder_errors(hrs, pipes["builtin"][0])
    figures["encoder"] = enc_err
    lines += _encoder_lines(enc_err)
    if not args.no_speed:
        lines += _speed_lines(pipes["builtin"][2], figures)
    lines += _floor_lines(figures, enc_err, len(files))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
