"""The builtin learned encoder: estimates how each image was degraded.

A small CNN (``pipeline.nets.DegradationNet``, weights shipped in ``pipeline/weights/``)
looks at up to 16 64x64 crops per image, taken on the 8x8 JPEG grid, and estimates the
Gaussian-equivalent noise sigma (0-255), the Gaussian blur sigma (pixels), whether the
image was JPEG-compressed and at what quality, and whether it was downscaled. Per-crop
estimates are combined by median (noise, blur, quality) and mean (probabilities). When the
image's own 8x8 luma DCT coefficients sit on an IJG quantisation grid (a JPEG that was not
resized or noised afterwards), that grid's quality replaces the CNN's JPEG estimate. The
``analysis`` encoder's measurements ride along in ``metrics`` and in the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.base import Encoder, ModelUnavailableError

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "builtin_encoder.safetensors"
CROP = 64
MAX_CROPS_PER_AXIS = 4
JPEG_THRESHOLD = 0.5  # P(JPEG) above which jpeg_quality is reported
TABLE_FIT_MIN_SCORE = 0.25  # quantisation-table fit score that proves JPEG (and its quality)
CROP_BATCH = 256


def _weights_path(model: str | None) -> Path:
    if model:
        path = Path(model)
        return path if path.suffix else WEIGHTS_DIR / f"{model}.safetensors"
    return DEFAULT_WEIGHTS


def crop_positions(length: int, crop: int = CROP, n_max: int = MAX_CROPS_PER_AXIS) -> list[int]:
    """Evenly spread crop starts, on multiples of 8 (the JPEG grid)."""
    if length <= crop:
        return [0]
    n = min(n_max, max(1, length // crop))
    starts = np.linspace(0, length - crop, n)
    return sorted({int(s) // 8 * 8 for s in starts})


def image_crops(rgb: np.ndarray) -> np.ndarray:
    """N x CROP x CROP x 3 uint8 crops of one image (small images are edge-padded on the
    right/bottom, which keeps the 8x8 grid where it was)."""
    h, w = rgb.shape[:2]
    if h < CROP or w < CROP:
        rgb = np.pad(rgb, ((0, max(0, CROP - h)), (0, max(0, CROP - w)), (0, 0)), mode="edge")
        h, w = rgb.shape[:2]
    return np.stack(
        [rgb[y : y + CROP, x : x + CROP] for y in crop_positions(h) for x in crop_positions(w)]
    )


def _ijg_tables() -> np.ndarray:
    """100 x 64 IJG luminance quantisation steps for qualities 1..100."""
    from pixelrelay.pipeline.nets import jpeg_step_table

    return np.stack([jpeg_step_table(q).numpy() for q in range(1, 101)]).astype(np.float64)


_DCT8 = None
_TABLES = None
# Frequencies used by the fit: the 5x5 low corner without DC (non-zero most often).
_FIT_FREQS = [u * 8 + v for u in range(5) for v in range(5) if (u, v) != (0, 0)]
MAX_FIT_BLOCKS = 1536


def jpeg_table_fit(rgb: np.ndarray) -> tuple[float, float]:
    """Fit the IJG quantisation table to the image's own 8x8 luma DCT coefficients.

    For every quality 1..100: the mean over coefficients that quantise to non-zero of
    cos(2 pi c / step) (1 when every coefficient sits on that quality's grid). Returns
    (best quality, its score); the score is ~0 for images that were never JPEG-compressed,
    or were resized or noised after compression, where only the CNN's estimate counts.
    """
    global _DCT8, _TABLES
    if _DCT8 is None:
        from pixelrelay.pipeline.nets import _dct_matrix

        _DCT8, _TABLES = _dct_matrix(8).numpy().astype(np.float64), _ijg_tables()
    h, w = (rgb.shape[0] // 8) * 8, (rgb.shape[1] // 8) * 8
    if h == 0 or w == 0:
        return 100.0, 0.0
    x = rgb[:h, :w].astype(np.float64)
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] - 128.0
    blocks = y.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    if len(blocks) > MAX_FIT_BLOCKS:  # a fixed, spread-out subset
        blocks = blocks[np.linspace(0, len(blocks) - 1, MAX_FIT_BLOCKS).astype(int)]
    coef = (_DCT8 @ blocks @ _DCT8.T).reshape(len(blocks), 64)[:, _FIT_FREQS]  # N x K
    steps = _TABLES[:, _FIT_FREQS]  # 100 x K
    scores = np.empty(100)
    for qi in range(100):
        st = steps[qi][None, :]
        mask = np.abs(coef) >= 0.5 * st
        n = mask.sum()
        scores[qi] = (np.cos(2 * np.pi * coef / st) * mask).sum() / (n + 1.0) if n >= 32 else 0.0
    best = int(np.argmax(scores))
    return float(best + 1), float(scores[best])


def _describe_estimates(noise: float, blur: float, quality: float | None, p_jpeg: float, p_down: float) -> str:
    parts = [f"estimated noise sigma {noise:.1f}", f"blur sigma {blur:.1f}"]
    parts.append(f"JPEG quality ~{quality:.0f}" if quality is not None else f"not JPEG-compressed (p={p_jpeg:.2f})")
    parts.append(f"{'likely' if p_down >= 0.5 else 'unlikely'} downscaled (p={p_down:.2f})")
    return ", ".join(parts)


class BuiltinEncoder(Encoder):
    """Learned degradation estimator + the analysis measurements."""

    kind = "builtin"

    def __init__(self, model: str | None = None, device: str = "cpu", settings: "Settings | None" = None) -> None:
        super().__init__(model=model, device=device, settings=settings)
        from pixelrelay.pipeline import nets
        from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder

        self.check_available(model)
        self.net, self.meta = nets.load_model(str(_weights_path(model)), kind="encoder", device=device)
        self.analysis = AnalysisEncoder(device=device, settings=self.settings)

    def compute_identity(self) -> str:
        from pixelrelay.pipeline.fingerprint import file_sha256

        return "builtin:sha256:" + file_sha256(_weights_path(self.model))

    @classmethod
    def check_available(cls, model: str | None) -> None:
        path = _weights_path(model)
        if not path.is_file():
            raise ModelUnavailableError(
                f"builtin encoder weights {path} are missing; they ship with pixelrelay "
                f"(reinstall it) or train them: pixelrelay train encoder --data DIR --out {path}"
            )

    def estimate(self, images: Sequence[DecodedImage]) -> list[dict[str, float | None]]:
        """Raw estimates per image: noise_sigma, blur_sigma, jpeg_quality (None), p_jpeg, p_downscaled."""
        import torch

        with torch.inference_mode():
            return self._estimate(images)

    def _estimate(self, images: Sequence[DecodedImage]) -> list[dict[str, float | None]]:
        import torch

        crops = [image_crops(im.rgb) for im in images]
        counts = [len(c) for c in crops]
        if not crops:
            return []
        allc = np.concatenate(crops)
        outs = []
        for i in range(0, len(allc), CROP_BATCH):
            x = torch.from_numpy(allc[i : i + CROP_BATCH]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            outs.append(self.net(x).float().cpu())
        pred = torch.cat(outs).numpy().astype(np.float64)
        results = []
        start = 0
        for n in counts:
            p = pred[start : start + n]
            start += n
            noise = max(0.0, float(np.median(p[:, 0])) * 50.0)
            blur = max(0.0, float(np.median(p[:, 1])) * 3.0)
            p_jpeg = float(np.mean(1.0 / (1.0 + np.exp(-p[:, 2]))))
            quality = float(np.clip(np.median(p[:, 3]) * 100.0, 1.0, 100.0))
            p_down = float(np.mean(1.0 / (1.0 + np.exp(-p[:, 4]))))
            fit_q, fit_score = jpeg_table_fit(images[len(results)].rgb)
            if fit_score >= TABLE_FIT_MIN_SCORE:  # the coefficients sit on a JPEG grid
                quality, p_jpeg = fit_q, max(p_jpeg, fit_score)
            results.append(
                {
                    "noise_sigma": round(noise, 2),
                    "blur_sigma": round(blur, 2),
                    "jpeg_quality": round(quality, 1) if p_jpeg >= JPEG_THRESHOLD else None,
                    "p_jpeg": round(p_jpeg, 3),
                    "p_downscaled": round(p_down, 3),
                }
            )
        return results

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        base = self.analysis.describe(images)
        out = []
        for d, est in zip(base, self.estimate(images)):
            metrics = dict(d.metrics)
            metrics.update(
                est_noise_sigma=float(est["noise_sigma"]),
                est_blur_sigma=float(est["blur_sigma"]),
                est_p_jpeg=float(est["p_jpeg"]),
                est_p_downscaled=float(est["p_downscaled"]),
            )
            if est["jpeg_quality"] is not None:
                metrics["est_jpeg_quality"] = float(est["jpeg_quality"])
            text = d.text + "; " + _describe_estimates(
                float(est["noise_sigma"]), float(est["blur_sigma"]), est["jpeg_quality"],
                float(est["p_jpeg"]), float(est["p_downscaled"]),
            )
            out.append(
                Description(
                    text=text,
                    metrics=metrics,
                    caption=d.caption,
                    noise_sigma=est["noise_sigma"],
                    blur_sigma=est["blur_sigma"],
                    jpeg_quality=est["jpeg_quality"],
                    downscaled=est["p_downscaled"],
                )
            )
        return out
