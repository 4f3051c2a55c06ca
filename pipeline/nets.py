"""The two builtin networks (pure torch): a degradation estimator and a conditional restorer.

``DegradationNet`` (encoder): a small CNN over 64x64 crops plus 8x8 DCT features -> noise,
blur, JPEG and downscale estimates. ``RestoreNet`` (decoder): a residual CNN over bicubic,
FiLM-conditioned on those estimates, with heads for x1, x2 and x4 on one body.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- conditioning ---------------------------------------------------------------------

COND_DIM = 4  # [noise/50, blur/3, jpeg flag, (100 - quality)/100 * flag]
SCALES = (1, 2, 4)


def cond_vector(noise_sigma: float, blur_sigma: float, jpeg_quality: float | None) -> list[float]:
    flag = 0.0 if jpeg_quality is None else 1.0
    q = 100.0 if jpeg_quality is None else float(jpeg_quality)
    return [
        max(0.0, float(noise_sigma)) / 50.0,
        max(0.0, float(blur_sigma)) / 3.0,
        flag,
        (100.0 - q) / 100.0 * flag,
    ]


# --- decoder ----------------------------------------------------------------------------


def _zero_init(*convs: nn.Module) -> None:
    """Zero the weight and bias of each conv: a branch that starts out adding nothing."""
    for conv in convs:
        assert isinstance(conv, nn.Conv2d)
        nn.init.zeros_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class FiLMBlock(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.film = nn.Linear(hidden, 2 * c)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.leaky_relu(self.conv1(x), 0.1, inplace=True))
        g, b = self.film(h).chunk(2, dim=1)
        # x + y * (1 + g) + b in two passes over memory, not four (this is memory-bound on CPU)
        return torch.addcmul(x, y, 1.0 + g[:, :, None, None]).add_(b[:, :, None, None])


class ContextBranch(nn.Module):
    """A multi-scale side branch: strided convs down to 1/2 and 1/4 of the body's resolution,
    FiLM blocks there, and back up; its output is added to the body's features. The last conv
    starts at zero, so a net grown from a plain ``RestoreNet`` starts out computing the same
    function. It gives the body a wide receptive field (heavy noise and JPEG need one) for
    little compute: the extra channels live at 1/4 and 1/16 of the pixels."""

    def __init__(self, c: int, hidden: int, channels: Sequence[int], blocks: Sequence[int]) -> None:
        super().__init__()
        self.downs = nn.ModuleList()
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        prev = c
        for ch, n in zip(channels, blocks, strict=True):
            self.downs.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            self.levels.append(nn.ModuleList(FiLMBlock(ch, hidden) for _ in range(n)))
            self.ups.append(nn.Conv2d(ch, 4 * prev, 3, padding=1))  # pixel-shuffled back to prev
            prev = ch
        _zero_init(self.ups[0])

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h0, w0 = x.shape[-2:]
        m = 2 ** len(self.downs)
        ph, pw = (-h0) % m, (-w0) % m
        y = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        skips = []
        for down, blocks in zip(self.downs, self.levels, strict=True):
            skips.append(y)
            y = F.leaky_relu(down(y), 0.1)
            for blk in blocks.children():
                y = blk(y, h)
        for i in reversed(range(len(self.downs))):
            y = F.pixel_shuffle(self.ups[i](y), 2)
            if i > 0:
                y = F.leaky_relu(y + skips[i], 0.1)
        return y[:, :, :h0, :w0]


class RestoreNet(nn.Module):
    def __init__(
        self,
        channels: int = 32,
        blocks: int = 6,
        hidden: int = 64,
        context_channels: Sequence[int] = (),
        context_blocks: Sequence[int] = (),
        context_after: int = 0,
    ) -> None:
        """The network's shape (kept in ``self.config``, saved with the weights).

        Args:
            channels: the body's width.
            blocks: FiLM blocks in the body.
            hidden: the condition MLP's width.
            context_channels: widths of the multi-scale context branch's levels; empty: no branch.
            context_blocks: FiLM blocks per context level.
            context_after: the index of the body block before which the context branch's output joins.
        """
        super().__init__()
        c = channels
        self.config: dict[str, Any] = {"channels": channels, "blocks": blocks, "hidden": hidden}
        if context_channels:
            self.config.update(
                context_channels=list(context_channels),
                context_blocks=list(context_blocks),
                context_after=context_after,
            )
        self.cond_mlp = nn.Sequential(
            nn.Linear(COND_DIM + len(SCALES), hidden),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.inputs = nn.ModuleDict(
            {
                "x1": nn.Conv2d(12, c, 3, padding=1),
                "x2": nn.Conv2d(3, c, 3, padding=1),
                "x4": nn.Conv2d(3, c, 3, padding=1),
            }
        )
        self.blocks = nn.ModuleList(FiLMBlock(c, hidden) for _ in range(blocks))
        self.context = ContextBranch(c, hidden, context_channels, context_blocks) if context_channels else None
        self.context_after = context_after
        self.body_out = nn.Conv2d(c, c, 3, padding=1)
        self.heads = nn.ModuleDict(
            {
                "x1": nn.Conv2d(c, 12, 3, padding=1),
                "x2": nn.Conv2d(c, 12, 3, padding=1),
                "x4": nn.Sequential(
                    nn.Conv2d(c, 4 * c, 3, padding=1),
                    nn.PixelShuffle(2),
                    nn.LeakyReLU(0.1, inplace=True),
                    nn.Conv2d(c, 12, 3, padding=1),
                ),
            }
        )
        x4 = self.heads["x4"]
        assert isinstance(x4, nn.Sequential)
        _zero_init(self.heads["x1"], self.heads["x2"], x4[-1])

    def forward(self, x: torch.Tensor, cond: torch.Tensor, scale: int) -> torch.Tensor:
        """x: Bx3xHxW in [0,1] (H, W even for scale 1); cond: BxCOND_DIM. Returns Bx3x(sH)x(sW)."""
        key = f"x{scale}"
        onehot = torch.zeros(x.shape[0], len(SCALES), device=x.device, dtype=x.dtype)
        onehot[:, SCALES.index(scale)] = 1.0
        h = self.cond_mlp(torch.cat([cond.to(x.dtype), onehot], dim=1))
        if scale == 1:
            base = x
            inp = F.pixel_unshuffle(x - 0.5, 2)
        else:
            base = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
            inp = x - 0.5
        f = self.inputs[key](inp)
        y = f
        for i, blk in enumerate(self.blocks):
            if self.context is not None and i == self.context_after:
                y = y + self.context(y, h)
            y = blk(y, h)
        y = self.body_out(y) + f
        r = F.pixel_shuffle(self.heads[key](y), 2)
        return base + r


# --- encoder ----------------------------------------------------------------------------

# IJG standard luminance quantisation table (natural order).
_LUMA_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
JPEG_CANDIDATES = (10, 20, 30, 40, 50, 55, 60, 65, 70, 75, 80, 85, 88, 90, 92, 94, 96, 98)
# Low/mid frequencies carry the most non-zero coefficients: use the 4x4 top-left, minus DC.
_FREQS = [u * 8 + v for u in range(4) for v in range(4) if (u, v) != (0, 0)]


def jpeg_step_table(quality: float) -> torch.Tensor:
    q = max(1.0, min(100.0, float(quality)))
    s = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    t = torch.tensor(_LUMA_TABLE, dtype=torch.float32)
    return torch.clamp(torch.floor((t * s + 50.0) / 100.0), 1.0, 255.0)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    d = torch.zeros(n, n)
    for k in range(n):
        for i in range(n):
            d[k, i] = math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    d[0] *= 1.0 / math.sqrt(2.0)
    return d * math.sqrt(2.0 / n)


class JpegFeatures(nn.Module):
    """Fixed (not learned) features: for each candidate quality, how well the crop's 8x8 luma
    DCT coefficients line up on that quality's quantisation grid (mean cos(2 pi c / step) over
    coefficients that quantise to non-zero). Crops must be aligned to the 8x8 JPEG grid."""

    dct: torch.Tensor
    steps: torch.Tensor
    freqs: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dct", _dct_matrix(8), persistent=False)
        steps = torch.stack([jpeg_step_table(q)[_FREQS] for q in JPEG_CANDIDATES])  # QxK
        self.register_buffer("steps", steps, persistent=False)
        self.register_buffer("freqs", torch.tensor(_FREQS), persistent=False)

    @property
    def dim(self) -> int:
        return len(JPEG_CANDIDATES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        h8, w8 = h - h % 8, w - w % 8
        y = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, :h8, :w8] * 255.0 - 128.0
        blocks = y.reshape(b, h8 // 8, 8, w8 // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)
        coef = self.dct @ blocks @ self.dct.T  # B x N x 8 x 8
        c = coef.reshape(b, -1, 64)[:, :, self.freqs]  # B x N x K
        step = self.steps[None, :, None, :]  # 1 x Q x 1 x K
        c = c[:, None]  # B x 1 x N x K
        mask = (c.abs() >= 0.5 * step).to(x.dtype)
        score = torch.cos(2.0 * math.pi * c / step) * mask
        num = score.sum(dim=(2, 3))
        den = mask.sum(dim=(2, 3))
        return num / (den + 1.0)


class StatFeatures(nn.Module):
    """Fixed (not learned) noise and blur statistics of a crop, log-scaled:

    * noise: Immerkaer's noise-sigma response per pixel (0-255 scale, channel mean), averaged
      over 8x8 blocks; the 5/10/25/50% quantiles over blocks (flat blocks read the noise);
    * blur: mean gradient magnitude and Laplacian magnitude of the luma, and their ratios to
      the same after a re-blur (sharp images lose more detail to a re-blur than soft ones);
      the 90% gradient quantile.
    """

    dim = 10
    immerkaer: torch.Tensor
    lap: torch.Tensor
    gauss: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
        self.register_buffer("immerkaer", (k * math.sqrt(math.pi / 2.0) / 6.0).view(1, 1, 3, 3), persistent=False)
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("lap", lap.view(1, 1, 3, 3), persistent=False)
        g = torch.exp(-0.5 * (torch.arange(-3, 4, dtype=torch.float32) / 1.0) ** 2)
        g = g / g.sum()
        self.register_buffer("gauss", (g[:, None] * g[None, :]).view(1, 1, 7, 7), persistent=False)

    def _grad(self, y: torch.Tensor) -> torch.Tensor:
        gx = y[:, :, 1:-1, 2:] - y[:, :, 1:-1, :-2]
        gy = y[:, :, 2:, 1:-1] - y[:, :, :-2, 1:-1]
        return torch.sqrt(gx * gx + gy * gy + 1e-6) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x255 = x * 255.0
        r = (
            F.conv2d(x255.reshape(b * c, 1, h, w), self.immerkaer)
            .abs()
            .reshape(b, c, h - 2, w - 2)
            .mean(1, keepdim=True)
        )
        blocks = F.avg_pool2d(r, 8, ceil_mode=True).flatten(1)
        q = torch.quantile(blocks, torch.tensor([0.05, 0.1, 0.25, 0.5], device=x.device), dim=1).T
        y = (0.299 * x255[:, 0] + 0.587 * x255[:, 1] + 0.114 * x255[:, 2])[:, None]
        yb = F.conv2d(F.pad(y, (3, 3, 3, 3), mode="replicate"), self.gauss)
        g, gb = self._grad(y), self._grad(yb)
        lp, lpb = F.conv2d(y, self.lap).abs(), F.conv2d(yb, self.lap).abs()
        gm, gbm = g.mean((1, 2, 3)), gb.mean((1, 2, 3))
        lm, lbm = lp.mean((1, 2, 3)), lpb.mean((1, 2, 3))
        g90 = torch.quantile(g.flatten(1), 0.9, dim=1)
        feats = torch.stack(
            [
                torch.log1p(q[:, 0]),
                torch.log1p(q[:, 1]),
                torch.log1p(q[:, 2]),
                torch.log1p(q[:, 3]),
                torch.log1p(gm),
                torch.log1p(lm),
                torch.log1p(g90),
                torch.log((gm + 0.1) / (gbm + 0.1)),
                torch.log((lm + 0.1) / (lbm + 0.1)),
                torch.log1p(r.mean((1, 2, 3))),
            ],
            dim=1,
        )
        return feats


ENCODER_OUTPUTS = ("noise", "blur", "jpeg_logit", "quality", "down_logit")


class DegradationNet(nn.Module):
    def __init__(self, channels: int = 32, hidden: int = 96, stat_features: bool = False) -> None:
        super().__init__()
        c = channels
        self.config = {"channels": channels, "hidden": hidden, "stat_features": stat_features}
        act = lambda: nn.LeakyReLU(0.1, inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), act(),
            nn.Conv2d(c, c, 3, padding=1), act(),
            nn.Conv2d(c, c * 3 // 2, 3, stride=2, padding=1), act(),
            nn.Conv2d(c * 3 // 2, c * 3 // 2, 3, padding=1), act(),
            nn.Conv2d(c * 3 // 2, 2 * c, 3, stride=2, padding=1), act(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), act(),
        )  # fmt: skip
        self.jpeg = JpegFeatures()
        self.stats = StatFeatures() if stat_features else None
        extra = self.jpeg.dim + (StatFeatures.dim if stat_features else 0)
        self.head = nn.Sequential(nn.Linear(2 * c + extra, hidden), act(), nn.Linear(hidden, len(ENCODER_OUTPUTS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: Bx3xHxW in [0,1], 8x8-grid aligned. Returns BxLEN(ENCODER_OUTPUTS) raw outputs:
        noise/50, blur/3, JPEG logit, quality/100, downscaled logit."""
        return self.forward_with_grid(x)[0]

    def forward_with_grid(
        self, x: torch.Tensor, trunk_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s outputs, plus the crops' JPEG grid scores (BxQ, ``JpegFeatures``):
        pixel evidence of JPEG compression that the encoder reuses, at no extra cost. With
        ``trunk_dtype`` the conv trunk (most of the cost) runs autocast to that dtype; the fixed
        features and the head stay fp32."""
        if trunk_dtype is None:
            f = self.features(x - 0.5).mean(dim=(2, 3))
        else:
            with torch.autocast(x.device.type, dtype=trunk_dtype):
                f = self.features(x - 0.5)
            f = f.float().mean(dim=(2, 3))
        grid = self.jpeg(x)
        parts = [f, grid]
        if self.stats is not None:
            parts.append(self.stats(x))
        return self.head(torch.cat(parts, dim=1)), grid


def build(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    cfg = dict(config or {})
    if kind == "decoder":
        return RestoreNet(**cfg)
    if kind == "encoder":
        return DegradationNet(**cfg)
    raise ValueError(f"unknown network kind {kind!r}")


# --- weights I/O (safetensors; the net config travels in the file's metadata) ----------


def save_model(
    net: nn.Module, kind: str, path: str, extra: dict[str, Any] | None = None, dtype: str = "float32"
) -> None:
    """Save a network's weights as safetensors, its config in the metadata.

    Args:
        net: the network.
        kind: "encoder" or "decoder" (checked by ``load_model``).
        path: the file.
        extra: more metadata (non-strings are stored as JSON).
        dtype: how floating tensors are stored ("float16" halves the file; ``load_model`` always
            returns a float32 net).
    """
    import json

    from safetensors.torch import save_file

    store = getattr(torch, dtype)
    state = {
        k: (v.to(store) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    meta = {"kind": kind, "config": json.dumps(getattr(net, "config", {})), "stored_dtype": dtype}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(state, str(path), metadata=meta)


def load_model(path: str, kind: str | None = None, device: str = "cpu") -> tuple[nn.Module, dict[str, str]]:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    file_kind = meta.get("kind")
    if kind is not None and file_kind != kind:
        raise ValueError(f"{path}: holds a {file_kind!r} network, expected {kind!r}")
    net = build(file_kind or "", json.loads(meta.get("config", "{}")))
    net.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return net.to(device).eval(), meta
