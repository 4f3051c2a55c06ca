"""The builtin learned encoder: estimates how each image was degraded.

``pixelrelay.pipeline.nets.DegradationNet`` sees at most ``N_CROPS`` 64x64 crops per image (a
subset of a grid on the 8x8 JPEG grid that depends only on the image's size), combined by
median and mean; strong noise on a non-JPEG blends toward the measured sigma
(``NOISE_MEASURED_FROM``). Where the pixels show JPEG evidence, the IJG table fit
(``jpeg_table_fit``) replaces the CNN's quality. Cost per image is bounded (``N_CROPS``,
``MAX_FIT_BLOCKS``, ``ANALYSIS_MAX_PIXELS``); a batch equals its per-item calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from pixelrelay.pipeline.hf import cpu_autocast_dtype
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.base import Encoder, ModelUnavailableError

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "builtin_encoder.safetensors"
CROP = 64
MAX_CROPS_PER_AXIS = 4  # the candidate grid: up to 4 x 4 crop positions
N_CROPS = 8  # crops the CNN sees per image, evenly spread over the candidates
JPEG_THRESHOLD = 0.5  # P(JPEG) above which jpeg_quality is reported
TABLE_FIT_MIN_SCORE = 0.25  # quantisation-table fit score that proves JPEG (and its quality)
# Pixel evidence that makes the table fit worth running. On the validation images, clean and
# noisy crops score <= 0.10 on the CNN's JPEG grid features, JPEG ones (quality 10-95) >= 0.26.
JPEG_EVIDENCE_GRID = 0.15
JPEG_EVIDENCE_BLOCKINESS = 1.3  # clean images read ~1.0 (<= 1.1 on the validation images)
ANALYSIS_MAX_PIXELS = 512 * 512  # larger images are measured on a sample (analysis.measure)
CROP_BATCH = 256
# Strong noise, no JPEG: the measured noise (analysis.noise_sigma, Immerkaer with edge
# exclusion: within ~1 of the truth from sigma ~20 on, but fooled by texture at low sigma)
# takes over from the CNN's crop median, linearly between these CNN estimates.
# Small images (fewer than N_CROPS crops, e.g. 2 overlapping ones on a 100-pixel image): one
# textured crop would decide the median, and texture only ever reads as more noise, so the
# noise is read at this lower percentile of the crops (clean x4 training images planned
# with an operation: 4/60 -> 1/60, noise and mild errors unchanged).
NOISE_FEW_CROPS_PERCENTILE = 30.0
NOISE_MEASURED_FROM = 15.0
NOISE_MEASURED_FULL = 25.0
ESTIMATE_VERSION = 3  # part of the identity: bump when the estimates may change


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


def select_crops(n_candidates: int, n: int = N_CROPS) -> list[int]:
    """Indices (row-major) of the candidates the CNN sees: all of them up to ``n``, else ``n``
    evenly spread ones. Depends on the count only, so it is deterministic. (Picking crops by
    texture makes the noise estimate worse on the validation images.)"""
    if n_candidates <= n:
        return list(range(n_candidates))
    return sorted({int(round(i)) for i in np.linspace(0, n_candidates - 1, n)})


def image_crops(rgb: np.ndarray) -> np.ndarray:
    """N x CROP x CROP x 3 uint8 crops of one image, N <= N_CROPS (small images are
    edge-padded on the right/bottom, which keeps the 8x8 grid where it was)."""
    h, w = rgb.shape[:2]
    if h < CROP or w < CROP:
        rgb = np.pad(rgb, ((0, max(0, CROP - h)), (0, max(0, CROP - w)), (0, 0)), mode="edge")
        h, w = rgb.shape[:2]
    candidates = [(y, x) for y in crop_positions(h) for x in crop_positions(w)]
    chosen = [candidates[i] for i in select_crops(len(candidates))]
    return np.stack([rgb[y : y + CROP, x : x + CROP] for y, x in chosen])


def _ijg_tables() -> np.ndarray:
    """100 x 64 IJG luminance quantisation steps for qualities 1..100."""
    from pixelrelay.pipeline.nets import jpeg_step_table

    return np.stack([jpeg_step_table(q).numpy() for q in range(1, 101)]).astype(np.float64)


_DCT8 = None
_STEPS = None
# Frequencies used by the fit: the 5x5 low corner without DC (non-zero most often).
_FIT_FREQS = [u * 8 + v for u in range(5) for v in range(5) if (u, v) != (0, 0)]
MAX_FIT_BLOCKS = 1536
FIT_MIN_COEFFICIENTS = 32  # a quality needs this many non-zero coefficients to score
FIT_COARSE_BLOCKS = 256  # the first pass ranks all qualities on this many blocks...
FIT_SHORTLIST = 8  # ...and the best this many are scored exactly on all blocks


class Estimate(TypedDict):
    """What the net estimates for one image (``jpeg_quality``: None when it is not a JPEG)."""

    noise_sigma: float
    blur_sigma: float
    jpeg_quality: float | None
    p_jpeg: float
    p_downscaled: float


def _grid_scores(coef: np.ndarray, steps: np.ndarray, min_count: int) -> np.ndarray:
    """Q scores: per quality (a row of ``steps``), the mean of cos(2 pi c / step) over the
    coefficients ``coef`` (N x K) that quantise to non-zero; 0 with fewer than ``min_count``."""
    ratio = coef[None, :, :] / steps[:, None, :]  # Q x N x K
    mask = np.abs(ratio) >= 0.5
    num = np.where(mask, np.cos(np.float32(2.0 * np.pi) * ratio), np.float32(0.0)).sum(axis=(1, 2), dtype=np.float64)
    n = mask.sum(axis=(1, 2))
    return np.where(n >= min_count, num / (n + 1.0), 0.0)


def jpeg_table_fit(rgb: np.ndarray) -> tuple[float, float]:
    """Fit the IJG quantisation table to the image's own 8x8 luma DCT coefficients.

    For every quality 1..100: the mean over coefficients that quantise to non-zero of
    cos(2 pi c / step) (1 when every coefficient sits on that quality's grid). Returns
    (best quality, its score); the score is ~0 for images that were never JPEG-compressed,
    or were resized or noised after compression, where only the CNN's estimate counts.
    Vectorised in two passes: every quality on a spread subset of blocks, then a shortlist of
    the best on all (at most ``MAX_FIT_BLOCKS``) blocks, whose best is returned.
    """
    global _DCT8, _STEPS
    if _DCT8 is None:
        from pixelrelay.pipeline.nets import _dct_matrix

        _DCT8 = _dct_matrix(8).numpy().astype(np.float64)
        _STEPS = _ijg_tables()[:, _FIT_FREQS].astype(np.float32)
    h, w = (rgb.shape[0] // 8) * 8, (rgb.shape[1] // 8) * 8
    if h == 0 or w == 0:
        return 100.0, 0.0
    pixels = rgb[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 8, 8, 3)
    if len(pixels) > MAX_FIT_BLOCKS:  # a fixed, spread-out subset
        pixels = pixels[np.linspace(0, len(pixels) - 1, MAX_FIT_BLOCKS).astype(int)]
    x = pixels.astype(np.float64)
    blocks = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] - 128.0
    coef = (_DCT8 @ blocks @ _DCT8.T).reshape(len(blocks), 64)[:, _FIT_FREQS].astype(np.float32)  # N x K
    qualities = np.arange(100)
    if len(coef) > 2 * FIT_COARSE_BLOCKS:
        coarse = coef[np.linspace(0, len(coef) - 1, FIT_COARSE_BLOCKS).astype(int)]
        min_coarse = max(1, FIT_MIN_COEFFICIENTS * FIT_COARSE_BLOCKS // len(coef))
        ranked = np.argsort(-_grid_scores(coarse, _STEPS, min_coarse), kind="stable")
        qualities = np.sort(ranked[:FIT_SHORTLIST])
    scores = _grid_scores(coef, _STEPS[qualities], FIT_MIN_COEFFICIENTS)
    best = int(np.argmax(scores))
    return float(qualities[best] + 1), float(scores[best])


def jpeg_evidence(grid_scores: np.ndarray, blockiness: float) -> bool:
    """Whether the pixels show JPEG compression: some crop-averaged IJG grid score (``grid_scores``
    is crops x candidate qualities) or the 8x8 blocking ratio passes its threshold."""
    grid = float(grid_scores.mean(axis=0).max()) if grid_scores.size else 0.0
    return grid >= JPEG_EVIDENCE_GRID or blockiness >= JPEG_EVIDENCE_BLOCKINESS


def _describe_estimates(noise: float, blur: float, quality: float | None, p_jpeg: float, p_down: float) -> str:
    parts = [f"estimated noise sigma {noise:.1f}", f"blur sigma {blur:.1f}"]
    parts.append(f"JPEG quality ~{quality:.0f}" if quality is not None else f"not JPEG-compressed (p={p_jpeg:.2f})")
    parts.append(f"{'likely' if p_down >= 0.5 else 'unlikely'} downscaled (p={p_down:.2f})")
    return ", ".join(parts)


def sampled_noise_sigma(rgb: np.ndarray, max_pixels: int | None = ANALYSIS_MAX_PIXELS) -> float:
    """The analysis encoder's ``noise_sigma`` with the same pixel budget (what ``describe``
    gets from ``pixelrelay.pipeline.stages.encoders.analysis.measure``), for ``estimate`` called on its own."""
    from pixelrelay.pipeline.stages.encoders.analysis import _luminance, noise_sigma_tiles, sample_tiles

    height, width = rgb.shape[:2]
    regions = sample_tiles(height, width, max_pixels)
    return noise_sigma_tiles([(rgb[ys, xs], _luminance(rgb[ys, xs])) for ys, xs in regions])


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


class BuiltinEncoder(Encoder):
    """Learned degradation estimator + the analysis measurements."""

    kind = "builtin"

    def __init__(self, model: str | None = None, device: str = "cpu", settings: Settings | None = None) -> None:
        super().__init__(model=model, device=device, settings=settings)
        from pixelrelay.pipeline import nets
        from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder

        self.check_available(model)
        net, self.meta = nets.load_model(str(_weights_path(model)), kind="encoder", device=device)
        assert isinstance(net, nets.DegradationNet)  # what kind="encoder" builds
        self.net = net
        self.analysis = AnalysisEncoder(device=device, settings=self.settings)
        self.analysis.max_pixels = ANALYSIS_MAX_PIXELS
        # the conv trunk in bf16 on CPUs that compute it natively (pipeline.hf): about half the
        # time for the same estimates (noise mean |err| 1.448 against 1.447 in fp32 on the
        # validation images); fp32 elsewhere and on GPUs
        self.trunk_dtype = cpu_autocast_dtype(device, self.settings.dtype)

    def compute_identity(self) -> str:
        from pixelrelay.pipeline.fingerprint import file_sha256

        # The estimate's own version beside the weights: how the estimate is computed from the
        # CNN (crops, the JPEG table fit, the measured noise) changes plans and outputs, so a
        # change there bumps ESTIMATE_VERSION, as new weights change the hash.
        return f"builtin:sha256:{file_sha256(_weights_path(self.model))}:estimate-v{ESTIMATE_VERSION}"

    @classmethod
    def check_available(cls, model: str | None) -> None:
        path = _weights_path(model)
        if not path.is_file():
            raise ModelUnavailableError(
                f"builtin encoder weights {path} are missing; they ship with pixelrelay "
                f"(reinstall it) or train them: pixelrelay train encoder --data DIR --out {path}"
            )

    def estimate(
        self,
        images: Sequence[DecodedImage],
        blockiness: Sequence[float] | None = None,
        measured_noise: Sequence[float] | None = None,
    ) -> list[Estimate]:
        """Raw estimates per image: noise_sigma, blur_sigma, jpeg_quality (None), p_jpeg, p_downscaled.
        ``blockiness`` and ``measured_noise`` (analysis metrics per image) are measured here
        when not given."""
        import torch

        with torch.inference_mode():
            return self._estimate(images, blockiness, measured_noise)

    def _run_net(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        outs, grids = [], []
        for i in range(0, len(crops), CROP_BATCH):
            x = torch.from_numpy(crops[i : i + CROP_BATCH]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            out, grid = self.net.forward_with_grid(x, self.trunk_dtype)
            outs.append(out.float().cpu())
            grids.append(grid.float().cpu())
        return torch.cat(outs).numpy().astype(np.float64), torch.cat(grids).numpy()

    def _estimate(
        self,
        images: Sequence[DecodedImage],
        blockiness: Sequence[float] | None,
        measured_noise: Sequence[float] | None = None,
    ) -> list[Estimate]:
        from pixelrelay.pipeline.stages.encoders.analysis import sampled_blockiness

        if not images:
            return []
        crops = [image_crops(im.rgb) for im in images]
        pred, grid = self._run_net(np.concatenate(crops))
        results = []
        start = 0
        for index, (image, n) in enumerate(zip(images, (len(c) for c in crops), strict=True)):
            p, g = pred[start : start + n], grid[start : start + n]
            start += n
            blocks = blockiness[index] if blockiness is not None else sampled_blockiness(image.rgb, ANALYSIS_MAX_PIXELS)
            measured = (
                measured_noise[index]
                if measured_noise is not None
                else (lambda rgb=image.rgb: sampled_noise_sigma(rgb, ANALYSIS_MAX_PIXELS))
            )
            results.append(self._combine(image, p, g, blocks, measured))
        return results

    def _combine(
        self,
        image: DecodedImage,
        p: np.ndarray,
        grid: np.ndarray,
        blocks: float,
        measured_noise: float | Callable[[], float] = 0.0,
    ) -> Estimate:
        q_noise = 50.0 if len(p) >= N_CROPS else NOISE_FEW_CROPS_PERCENTILE
        noise = max(0.0, float(np.percentile(p[:, 0], q_noise)) * 50.0)
        blur = max(0.0, float(np.median(p[:, 1])) * 3.0)
        p_jpeg = float(np.mean(_sigmoid(p[:, 2])))
        quality = float(np.clip(np.median(p[:, 3]) * 100.0, 1.0, 100.0))
        p_down = float(np.mean(_sigmoid(p[:, 4])))
        if jpeg_evidence(grid, blocks):
            fit_q, fit_score = jpeg_table_fit(image.rgb)
            if fit_score >= TABLE_FIT_MIN_SCORE:  # the coefficients sit on a JPEG grid
                quality, p_jpeg = fit_q, max(p_jpeg, fit_score)
        if noise > NOISE_MEASURED_FROM and p_jpeg < JPEG_THRESHOLD:  # JPEG smears what is measured
            w = min(1.0, (noise - NOISE_MEASURED_FROM) / (NOISE_MEASURED_FULL - NOISE_MEASURED_FROM))
            measured = float(measured_noise() if callable(measured_noise) else measured_noise)
            noise = (1.0 - w) * noise + w * measured
        return {
            "noise_sigma": round(noise, 2),
            "blur_sigma": round(blur, 2),
            "jpeg_quality": round(quality, 1) if p_jpeg >= JPEG_THRESHOLD else None,
            "p_jpeg": round(p_jpeg, 3),
            "p_downscaled": round(p_down, 3),
        }

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        base = self.analysis.describe(images)
        out = []
        estimates = self.estimate(
            images, [d.metrics["blockiness"] for d in base], [d.metrics["noise_sigma"] for d in base]
        )
        for d, est in zip(base, estimates, strict=True):
            metrics = dict(d.metrics)
            metrics.update(
                est_noise_sigma=float(est["noise_sigma"]),
                est_blur_sigma=float(est["blur_sigma"]),
                est_p_jpeg=float(est["p_jpeg"]),
                est_p_downscaled=float(est["p_downscaled"]),
            )
            if est["jpeg_quality"] is not None:
                metrics["est_jpeg_quality"] = float(est["jpeg_quality"])
            text = (
                d.text
                + "; "
                + _describe_estimates(
                    float(est["noise_sigma"]),
                    float(est["blur_sigma"]),
                    est["jpeg_quality"],
                    float(est["p_jpeg"]),
                    float(est["p_downscaled"]),
                )
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
