"""``pixelrelay train encoder|decoder --data DIR --out PATH [--config FILE] [--seed N] [--steps N]``

Trains the builtin degradation estimator (encoder) or the conditional restorer (decoder)
on random crops of the training part of DIR (the fixed split of ``pipeline.training.data``),
degraded on the fly by ``pipeline.degradations``. Writes the weights as safetensors (the net
config and training config ride in its metadata) and a JSON-lines log of the loss and of the
validation metrics next to it (``--log`` to put it elsewhere). Reproducible: the seed fixes
the crops, the degradations and the initialisation (on a given torch build and thread count).
Resumable (``training.checkpoint``): a run that is stopped or killed continues from the
checkpoint beside OUT when started again with the same arguments (``--fresh`` starts over),
and ends with the same weights as a run that never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline import nets
from pixelrelay.training import checkpoint, data
from pixelrelay.training import degradations as D

CONFIG_DIR = Path(__file__).with_name("configs")


def load_config(kind: str, path: str | None) -> dict[str, Any]:
    with open(path or CONFIG_DIR / f"{kind}.json") as f:
        return json.load(f)


class Log:
    def __init__(self, path: Path, echo: bool = True, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a" if append else "w")
        self.echo = echo

    def write(self, **rec: Any) -> None:
        line = json.dumps(rec, default=float)
        self.f.write(line + "\n")
        self.f.flush()
        if self.echo:
            print(line, flush=True)

    def close(self) -> None:
        self.f.close()


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    base, warm, total = cfg["lr"], cfg.get("warmup", 100), cfg["steps"]
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.get("lr_min", base * 0.01) + 0.5 * (base - cfg.get("lr_min", base * 0.01)) * (1 + math.cos(math.pi * t))


class single_thread:
    """Degradation synthesis works on small tensors: torch's intra-op threads only add
    overhead there (a lot of it on a loaded machine), so it runs on one thread."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


def stack(imgs: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.cat([D.to_tensor(i) for i in imgs], dim=0)


# --- decoder ---------------------------------------------------------------------------


def jittered_cond(p: D.DegradationParams, rng: np.random.Generator, jit: dict[str, float]) -> list[float]:
    """The conditioning a decoder would get from an (imperfect) encoder for these params."""
    noise = p.noise_sigma + rng.normal(0, jit.get("noise", 0.0)) if p.noise_sigma > 0 else 0.0
    blur = p.blur_sigma + rng.normal(0, jit.get("blur", 0.0)) if p.blur_sigma > 0 else 0.0
    q: float | None = p.jpeg_quality
    if q is not None:
        q = float(np.clip(q + rng.normal(0, jit.get("quality", 0.0)), 1, 100))
    return nets.cond_vector(max(0.0, noise), max(0.0, blur), q)


class PipelineCondition:
    """The condition the deployed pipeline gives a degraded image: the builtin encoder reads
    it, the rules planner plans it and ``plan_condition`` turns the plan into the network's
    input; None when the plan has no operations (the pipeline sends such an image to the
    upscaler). A restorer trained on this rather than on the true parameters learns what the
    estimates mean, e.g. that noise reads low under strong JPEG."""

    def __init__(self, encoder_model: str | None = None) -> None:
        # Imported here, not at the top: only this training mode needs the stages.
        from pixelrelay.pipeline.imageio import DecodedImage
        from pixelrelay.pipeline.messages import JobOptions
        from pixelrelay.pipeline.stages.decoders.builtin import plan_condition
        from pixelrelay.pipeline.stages.encoders.builtin import BuiltinEncoder
        from pixelrelay.pipeline.stages.planners.rules import RulesPlanner

        self.encoder = BuiltinEncoder(model=encoder_model)
        self.planner = RulesPlanner()
        self.options = {s: JobOptions(task="upscale" if s > 1 else "restore", scale=s) for s in nets.SCALES}
        self._image, self._plan_condition = DecodedImage, plan_condition

    def __call__(self, lr: np.ndarray, scale: int) -> list[float] | None:
        description = self.encoder.describe([self._image(rgb=lr)])[0]
        plan = self.planner.plan_one(description, self.options[scale])
        return self._plan_condition(plan) if plan.operations else None


MAX_CONDITION_REDRAWS = 8


def pick_degradation(cfg: dict[str, Any], dcfg: D.DegradationConfig, rng: np.random.Generator) -> D.DegradationConfig:
    """The config's degradation, or with probability ``p_mild`` the everyday one
    (``degradations.MILD``): the training mix weighted like everyday files. Without
    ``p_mild`` no random number is drawn, so older configs reproduce exactly."""
    if cfg.get("p_mild"):
        return D.MILD if rng.random() < cfg["p_mild"] else dcfg
    return dcfg


def overshoot_penalty(
    out: torch.Tensor,
    target: torch.Tensor,
    radius: int = 2,
    edges_only: bool = False,
    edge_quantile: float = 0.9,
    min_gradient: float = 20.0 / 255.0,
) -> torch.Tensor:
    """How far ``out`` goes beyond ``target``'s local range (a (2·radius+1)² window): the
    halos and ringing a network trained on L1 alone draws along strong edges (the training
    counterpart of ``degradations.edge_overshoot``). Zero wherever the output stays in range.
    With ``edges_only`` it is averaged, as the measure is, over the pixels within ``radius``
    of a strong edge of the target (luma Sobel magnitude above its ``edge_quantile`` in each
    sample and above ``min_gradient``), so texture elsewhere is left to the L1 term.

    Args:
        out: the network's output, (B, 3, H, W).
        target: the high-res target, same shape.
        radius: the local window's radius, in pixels.
        edges_only: average over the pixels near strong target edges only.
        edge_quantile: per sample, the Sobel-magnitude quantile above which a pixel is an edge.
        min_gradient: the smallest Sobel magnitude that counts as an edge.
    """
    size = 2 * radius + 1
    hi = F.max_pool2d(target, size, stride=1, padding=radius)
    lo = -F.max_pool2d(-target, size, stride=1, padding=radius)
    over = F.relu(out - hi) + F.relu(lo - out)
    if not edges_only:
        return over.mean()
    near = strong_edges(target, radius, edge_quantile, min_gradient)
    return (over * near).sum() / (near.sum() * over.shape[1]).clamp(min=1.0)


def strong_edges(target: torch.Tensor, radius: int, edge_quantile: float, min_gradient: float) -> torch.Tensor:
    """N x 1 x H x W mask of the pixels within ``radius`` of a strong edge of ``target``."""
    y = (target * target.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    kx = target.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])[None, None]
    yp = F.pad(y, (1, 1, 1, 1), mode="reflect")
    grad = torch.hypot(F.conv2d(yp, kx), F.conv2d(yp, kx.transpose(-1, -2))) / 8.0
    thr = torch.quantile(grad.flatten(1), edge_quantile, dim=1).clamp(min=min_gradient)
    strong = (grad > thr[:, None, None, None]).float()
    return (F.max_pool2d(strong, 2 * radius + 1, stride=1, padding=radius) > 0).float()


def pipeline_conditioned_sample(
    imgs: list[np.ndarray],
    scale: int,
    cfg: dict[str, Any],
    dcfg: D.DegradationConfig,
    rng: np.random.Generator,
    condition: PipelineCondition,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A degraded patch with the pipeline's condition: a ``cond_context``-pixel (low-res)
    region is degraded and read as a whole, as the encoder reads an image, and an
    ``lr_patch`` crop of it is trained on. Regions the plan sends to the upscaler are redrawn.

    Args:
        imgs: the training images (HWC uint8).
        scale: the upscaling factor trained.
        cfg: the training config (``lr_patch``, ``cond_context``).
        dcfg: the degradations drawn.
        rng: the run's generator (crops and degradations).
        condition: the pipeline's encoder and planner, which read the degraded region.
    """
    p_lr = cfg["lr_patch"]
    ctx = max(p_lr, int(cfg.get("cond_context", 96)))
    for _ in range(MAX_CONDITION_REDRAWS):
        hr = data.random_crop(imgs[int(rng.integers(len(imgs)))], ctx * scale, rng)
        lr, _ = D.degrade(hr, scale, rng, pick_degradation(cfg, dcfg, rng))
        cond = condition(lr, scale)
        if cond is not None:
            break
    else:
        cond = nets.cond_vector(0.0, 0.0, None)
    y, x = (int(v) for v in rng.integers(0, ctx - p_lr + 1, 2))
    hr_patch = hr[y * scale : (y + p_lr) * scale, x * scale : (x + p_lr) * scale]
    return np.ascontiguousarray(lr[y : y + p_lr, x : x + p_lr]), np.ascontiguousarray(hr_patch), cond


def decoder_sample(
    imgs: list[np.ndarray],
    scale: int,
    cfg: dict[str, Any],
    dcfg: D.DegradationConfig,
    rng: np.random.Generator,
    condition: PipelineCondition | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A (low-res, high-res, condition) training triple: a clean pair with the zero condition
    (``p_clean``), else a degraded one conditioned on its jittered true parameters, or with
    ``condition`` (the config's ``"cond_source": "pipeline"``) on what the pipeline reads.

    Args:
        imgs: the training images (HWC uint8).
        scale: the upscaling factor trained.
        cfg: the training config (``lr_patch``, ``p_clean``, the condition's jitter).
        dcfg: the degradations drawn.
        rng: the run's generator (crops, degradations, jitter).
        condition: the pipeline's reading, or None for the true parameters.
    """
    if condition is not None:
        return pipeline_conditioned_sample(imgs, scale, cfg, dcfg, rng, condition)
    p_lr = cfg["lr_patch"]
    hr = data.random_crop(imgs[int(rng.integers(len(imgs)))], p_lr * scale, rng)
    clean_p = cfg["p_clean"].get(str(scale), 0.3)
    if rng.random() < clean_p:
        lr = hr if scale == 1 else D.bicubic_pair(hr, scale)[1]
        return lr, hr, nets.cond_vector(0.0, 0.0, None)
    lr, params = D.degrade(hr, scale, rng, pick_degradation(cfg, dcfg, rng))
    return lr, hr, jittered_cond(params, rng, cfg.get("cond_jitter", {}))


def decoder_val_set(
    val_imgs: list[np.ndarray],
    cfg: dict[str, Any],
    dcfg: D.DegradationConfig,
    seed: int,
    condition: PipelineCondition | None = None,
):
    """Fixed validation crops: (name, scale, lr batch, hr batch, cond) groups. The realistic
    group is conditioned on its true parameters, or with ``condition`` on what the pipeline
    reads (as the net is trained; the true parameters where that plan has no operation)."""
    size = cfg.get("val_crop", 192)
    crops = [data.center_crop(im, size) for im in val_imgs]
    groups = []
    for scale in (2, 4):
        pairs = [D.bicubic_pair(c, scale) for c in crops]
        groups.append(
            (
                f"bicubic_x{scale}",
                scale,
                [p[1] for p in pairs],
                [p[0] for p in pairs],
                [nets.cond_vector(0, 0, None)] * len(pairs),
            )
        )
    rng = np.random.default_rng(seed + 1000)
    lrs, hrs, conds = [], [], []
    for c in crops:
        lr, p = D.degrade(c, 2, rng, dcfg, force=("blur", "noise", "jpeg"))
        read = condition(lr, 2) if condition is not None else None
        lrs.append(lr)
        hrs.append(D.crop_to_multiple(c, 2))
        conds.append(read if read is not None else nets.cond_vector(p.noise_sigma, p.blur_sigma, p.jpeg_quality))
    groups.append(("realistic_x2", 2, lrs, hrs, conds))
    return groups


@torch.inference_mode()
def decoder_validate(net: torch.nn.Module, groups) -> dict[str, float]:
    net.eval()
    out: dict[str, float] = {}
    for name, scale, lrs, hrs, conds in groups:
        x = stack(lrs)
        y = net(x, torch.tensor(conds, dtype=torch.float32), scale)
        base = D.upscale_bicubic(x, scale)
        gains, ps = [], []
        for i, hr in enumerate(hrs):
            p_net = D.psnr_y(D.to_uint8(y[i]), hr, border=scale)
            p_bic = D.psnr_y(D.to_uint8(base[i]), hr, border=scale)
            ps.append(p_net)
            gains.append(p_net - p_bic)
        out[f"{name}_psnr"] = float(np.mean(ps))
        out[f"{name}_gain_db"] = float(np.mean(gains))
    net.train()
    return out


def _net_config(net: torch.nn.Module) -> dict[str, Any]:
    """A builtin network's shape (``nets`` keeps it in ``config``, a dict)."""
    config = getattr(net, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"{type(net).__name__} keeps no net config (a dict in .config)")
    return config


def build_net(kind: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """A fresh network, or one initialised from ``cfg["init"]`` (a safetensors file of this
    kind, e.g. an earlier stage of a multi-stage schedule). The file's net config wins, except
    that ``cfg["grow"]`` may add modules to it (e.g. a decoder's context branch): those start
    from their own (zero-output) initialisation and every other weight comes from the file."""
    init = cfg.get("init")
    if not init:
        return nets.build(kind, cfg.get("net"))
    path = Path(init)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / init
    net, _ = nets.load_model(str(path), kind=kind)
    if cfg.get("grow"):
        grown = nets.build(kind, {**_net_config(net), **cfg["grow"]})
        result = grown.load_state_dict(net.state_dict(), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"grow: {path} has weights the grown net lacks: {result.unexpected_keys[:5]}")
        new = sorted({k.split(".")[0] for k in result.missing_keys})
        print(f"grow: new modules {new} ({len(result.missing_keys)} tensors) start fresh", file=sys.stderr)
        net = grown
    cfg["net"] = _net_config(net)
    return net.train()


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(cfg: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The training forward pass's mixed precision: the config's ``autocast`` ("bfloat16"
    halves the step time on CPUs with AVX512-BF16 or AMX); off by default. Only the trained
    net's forward runs under it: data synthesis, the loss, the weights, the optimiser and
    validation stay float32."""
    name = cfg.get("autocast")
    if name is None:
        return contextlib.nullcontext()
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or absent, not {name!r}")
    return torch.autocast("cpu", dtype=AUTOCAST_DTYPES[name])  # training runs on the CPU


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint; ``code`` is the exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class TrainRun:
    """One training run: what it trains, how, and where the weights go.

    Attributes:
        kind: "encoder" or "decoder" (the model saved; part of the checkpoint's identity).
        cfg: the training config (``configs/<kind>.json`` with the command line's overrides).
        seed: fixes the crops, the degradations and the initialisation.
        out: the weights' path; the checkpoint lies beside it (``checkpoint.path_for``).
        fresh: start over, replacing the checkpoint, rather than resume from it.
    """

    kind: str
    cfg: dict[str, Any]
    seed: int
    out: Path
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class Objective:
    """What ``optimise`` trains and how it scores it.

    Attributes:
        net: the module trained.
        batch_loss: draws a training batch and returns its loss (a scalar tensor).
        validate: the validation metrics, by name.
    """

    net: torch.nn.Module
    batch_loss: Callable[[], torch.Tensor]
    validate: Callable[[], dict[str, float]]


def optimise(run: TrainRun, objective: Objective, rng: np.random.Generator, log: Log) -> dict[str, float]:
    """The loop both models share: Adam on the config's schedule with gradient clipping, the
    mean loss logged every ``log_every`` steps, validation and the weights every ``val_every``,
    a checkpoint (``training.checkpoint``) every ``checkpoint_every``. It resumes from the
    checkpoint beside ``run.out`` unless ``run.fresh``; ``rng`` is saved with it."""
    cfg, net, out, seed, kind = run.cfg, objective.net, run.out, run.seed, run.kind
    batch_loss, validate = objective.batch_loss, objective.validate
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"], betas=(0.9, 0.99))
    ckpt, run_id = checkpoint.path_for(out), checkpoint.identity(kind, seed, cfg)
    progress = checkpoint.Progress()
    if ckpt.exists() and not run.fresh:
        progress = checkpoint.load(ckpt, run_id, net, opt, rng)
        log.write(event="resume", step=progress.step, checkpoint=str(ckpt))
    every = cfg.get("checkpoint_every", cfg.get("val_every", 500))
    t0, metrics = time.time() - progress.elapsed_s, {}
    with checkpoint.StopRequest() as stop:
        for step in range(progress.step, cfg["steps"]):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = batch_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.get("clip", 1.0))
            opt.step()
            progress.running.append(loss.item())
            if (step + 1) % cfg.get("log_every", 50) == 0:
                log.write(
                    step=step + 1,
                    loss=float(np.mean(progress.running)),
                    lr=lr_at(step, cfg),
                    elapsed_s=time.time() - t0,
                )
                progress.running = []
            if (step + 1) % cfg.get("val_every", 500) == 0 or step + 1 == cfg["steps"]:
                metrics = validate()
                log.write(event="val", step=step + 1, elapsed_s=time.time() - t0, **metrics)
                nets.save_model(
                    net,
                    kind,
                    str(out),
                    {"step": step + 1, "seed": seed, "train_config": cfg},
                    dtype=cfg.get("save_dtype", "float32"),
                )
            if (step + 1) % every == 0 or step + 1 == cfg["steps"] or stop.signum:
                progress.step, progress.elapsed_s = step + 1, time.time() - t0
                checkpoint.save(ckpt, run_id, net, opt, rng, progress)
            if stop.signum:
                log.write(event="stopped", step=step + 1, signal=signal.Signals(stop.signum).name, checkpoint=str(ckpt))
                raise Stopped(stop.exit_code)
    return metrics or validate()  # a run resumed at its last step validates once


def train_decoder(run: TrainRun, train_imgs: list, val_imgs: list, log: Log) -> dict[str, float]:
    """Train the builtin decoder on ``train_imgs``, validating on ``val_imgs``; its last metrics."""
    cfg, seed = run.cfg, run.seed
    dcfg = D.DegradationConfig.from_dict(cfg.get("degradation"))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = build_net("decoder", cfg).to(memory_format=torch.channels_last)  # faster convs on CPU
    source = cfg.get("cond_source", "true")
    if source not in ("true", "pipeline"):
        raise ValueError(f"cond_source must be 'true' or 'pipeline', not {source!r}")
    condition = PipelineCondition(cfg.get("cond_encoder")) if source == "pipeline" else None
    with single_thread():
        groups = decoder_val_set(val_imgs, cfg, dcfg, seed, condition)
    scales = [int(s) for s in cfg["scale_probs"]]
    probs = np.array([cfg["scale_probs"][str(s)] for s in scales], dtype=np.float64)
    probs /= probs.sum()

    def batch_loss() -> torch.Tensor:
        scale = scales[int(rng.choice(len(scales), p=probs))]
        with single_thread():
            batch = [decoder_sample(train_imgs, scale, cfg, dcfg, rng, condition) for _ in range(cfg["batch"])]
        x, y = stack([b[0] for b in batch]), stack([b[1] for b in batch])
        cond = torch.tensor([b[2] for b in batch], dtype=torch.float32)
        with autocast(cfg):
            out = net(x.contiguous(memory_format=torch.channels_last), cond, scale)
        loss = F.l1_loss(out.float(), y)
        if cfg.get("overshoot_weight"):  # against halos on edges; off unless the config sets it
            loss = loss + cfg["overshoot_weight"] * overshoot_penalty(
                out.float(), y, cfg.get("overshoot_radius", 2), edges_only=cfg.get("overshoot_edges", False)
            )
        return loss

    return optimise(run, Objective(net, batch_loss, lambda: decoder_validate(net, groups)), rng, log)


# --- encoder ---------------------------------------------------------------------------


def encoder_target(p: D.DegradationParams) -> list[float]:
    return [
        p.noise_sigma / 50.0,
        p.blur_sigma / 3.0,
        0.0 if p.jpeg_quality is None else 1.0,
        (p.jpeg_quality or 100) / 100.0,
        1.0 if p.downscaled else 0.0,
    ]


def encoder_sample(imgs, cfg, dcfg, rng) -> tuple[np.ndarray, list[float]]:
    scales = [int(s) for s in cfg["scale_probs"]]
    probs = np.array([cfg["scale_probs"][str(s)] for s in scales], dtype=np.float64)
    scale = scales[int(rng.choice(len(scales), p=probs / probs.sum()))]
    patch = cfg["patch"]
    hr = data.random_crop(imgs[int(rng.integers(len(imgs)))], patch * scale, rng)
    if rng.random() < cfg.get("p_clean", 0.15):
        lr = hr if scale == 1 else D.to_uint8(D.downscale(D.to_tensor(hr), scale, "bicubic"))
        return lr, encoder_target(D.DegradationParams(scale=scale, downscaled=scale > 1))
    lr, params = D.degrade(hr, scale, rng, pick_degradation(cfg, dcfg, rng))
    return lr, encoder_target(params)


def encoder_loss(pred: torch.Tensor, tgt: torch.Tensor, w: dict[str, float]) -> torch.Tensor:
    is_jpeg = tgt[:, 2]
    l_noise = F.l1_loss(pred[:, 0], tgt[:, 0])
    l_blur = F.l1_loss(pred[:, 1], tgt[:, 1])
    l_jpeg = F.binary_cross_entropy_with_logits(pred[:, 2], is_jpeg)
    l_q = ((pred[:, 3] - tgt[:, 3]).abs() * is_jpeg).sum() / is_jpeg.sum().clamp(min=1.0)
    l_down = F.binary_cross_entropy_with_logits(pred[:, 4], tgt[:, 4])
    return (
        w.get("noise", 1.0) * l_noise
        + w.get("blur", 0.5) * l_blur
        + w.get("jpeg", 0.2) * l_jpeg
        + w.get("quality", 1.0) * l_q
        + w.get("down", 0.1) * l_down
    )


@torch.inference_mode()
def encoder_validate(net, x: torch.Tensor, tgt: torch.Tensor) -> dict[str, float]:
    net.eval()
    pred = net(x)
    net.train()
    is_jpeg = tgt[:, 2] > 0.5
    pj = pred[:, 2] > 0
    q_err = ((pred[:, 3] - tgt[:, 3]).abs() * 100.0)[is_jpeg]
    noisy = tgt[:, 0] > 0
    n_err = (pred[:, 0] - tgt[:, 0]).abs() * 50.0
    return {
        "noise_mae": float(n_err.mean()),
        "noise_within3": float((n_err <= 3).float().mean()),
        "noise_mae_noisy": float(n_err[noisy].mean()) if noisy.any() else 0.0,
        "blur_mae": float(((pred[:, 1] - tgt[:, 1]).abs() * 3.0).mean()),
        "jpeg_acc": float((pj == is_jpeg).float().mean()),
        "quality_mae": float(q_err.mean()) if q_err.numel() else 0.0,
        "quality_within10": float((q_err <= 10).float().mean()) if q_err.numel() else 0.0,
        "down_acc": float(((pred[:, 4] > 0) == (tgt[:, 4] > 0.5)).float().mean()),
    }


def train_encoder(run: TrainRun, train_imgs: list, val_imgs: list, log: Log) -> dict[str, float]:
    """Train the builtin encoder on ``train_imgs``, validating on ``val_imgs``; its last metrics."""
    cfg, seed = run.cfg, run.seed
    dcfg = D.DegradationConfig.from_dict(cfg.get("degradation"))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = build_net("encoder", cfg)
    vrng = np.random.default_rng(seed + 1000)
    with single_thread():
        vs = [encoder_sample(val_imgs, cfg, dcfg, vrng) for _ in range(cfg.get("val_samples", 256))]
    vx, vt = stack([s[0] for s in vs]), torch.tensor([s[1] for s in vs], dtype=torch.float32)
    weights = cfg.get("loss_weights", {})

    def batch_loss() -> torch.Tensor:
        with single_thread():
            batch = [encoder_sample(train_imgs, cfg, dcfg, rng) for _ in range(cfg["batch"])]
        x = stack([b[0] for b in batch])
        tgt = torch.tensor([b[1] for b in batch], dtype=torch.float32)
        with autocast(cfg):
            pred = net(x)
        return encoder_loss(pred.float(), tgt, weights)

    return optimise(run, Objective(net, batch_loss, lambda: encoder_validate(net, vx, vt)), rng, log)


# --- entry -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pixelrelay train", description="Train a builtin model.")
    ap.add_argument("kind", choices=("encoder", "decoder"))
    ap.add_argument("--data", required=True, help="image folder (sub-folders each split 4:1)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--config", default=None, help="JSON config (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    ap.add_argument("--steps", type=int, default=None, help="overrides the config's steps")
    ap.add_argument("--init", default=None, help="start from these weights (overrides the config's init)")
    ap.add_argument("--log", default=None, help="JSON-lines log (default: OUT with .jsonl)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: config, 2)")
    ap.add_argument(
        "--fresh", action="store_true", help="start over, replacing the checkpoint beside OUT (default: resume from it)"
    )
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.kind, args.config)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.init is not None:
        cfg["init"] = args.init
    seed = args.seed if args.seed is not None else cfg.get("seed", 0)
    torch.set_num_threads(args.threads or cfg.get("threads", 2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = data.split_or_explain(args.data, "pixelrelay train")
    if parts is None:
        return ExitCode.USAGE
    train_files, val_files = parts
    if not train_files:
        print("pixelrelay train: no training images (every fifth file is validation)", file=sys.stderr)
        return ExitCode.USAGE
    resuming = checkpoint.path_for(out).exists() and not args.fresh
    log = Log(Path(args.log) if args.log else out.with_suffix(".jsonl"), echo=not args.quiet, append=resuming)
    if not val_files:  # tiny folders: validate on the training files rather than not at all
        val_files = train_files[:1]
    log.write(
        event="config",
        kind=args.kind,
        seed=seed,
        config=cfg,
        data=str(args.data),
        train_files=len(train_files),
        val_files=len(val_files),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        argv=list(argv) if argv is not None else sys.argv[1:],
    )
    t0 = time.time()
    train_imgs, val_imgs = data.load_images(train_files), data.load_images(val_files)
    fn = train_decoder if args.kind == "decoder" else train_encoder
    try:
        metrics = fn(TrainRun(args.kind, cfg, seed, out, args.fresh), train_imgs, val_imgs, log)
    except checkpoint.CheckpointMismatch as exc:
        print(f"pixelrelay train: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except Stopped as exc:  # SIGTERM / SIGINT: the checkpoint is saved; run again to go on
        log.close()
        print(f"pixelrelay train: stopped; checkpoint {checkpoint.path_for(out)}", file=sys.stderr)
        return exc.code
    log.write(event="done", elapsed_s=time.time() - t0, out=str(out), **metrics)
    log.close()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
