"""Encoder that captions images with a vision-language model (``hf-caption:MODEL``).

Any ``AutoModelForImageTextToText`` captioner loads; chat VLMs get a one-line prompt. The
caption joins the analysis measurements (``Description.text`` is "<caption>. <analysis
sentence>"). Greedy and batched, so a batch equals its singles; on CUDA out-of-memory the
batch is halved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pixelrelay.pipeline import hf
from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description
from pixelrelay.pipeline.stages.base import Encoder
from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings

log = logging.getLogger("pixelrelay.encoder.hf_caption")

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_BATCH_SIZE = 16
MAX_NEW_TOKENS = 30
CHAT_PROMPT = "Describe this image in one short sentence."


class HFCaptionEncoder(Encoder):
    kind = "hf-caption"
    default_model = DEFAULT_MODEL

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: int = MAX_NEW_TOKENS,
        dtype: Any = None,
    ) -> None:
        """Load the captioner (from a local folder or the Hugging Face cache only).

        Args:
            model: a hub id or a local folder; None: ``DEFAULT_MODEL``.
            device: a torch device string.
            settings: the worker's settings (dtype).
            batch_size: images per generate call (halved on CUDA out-of-memory).
            max_new_tokens: the caption's length bound.
            dtype: overrides the settings' dtype.
        """
        super().__init__(model=model, device=device, settings=settings)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_id = model or DEFAULT_MODEL
        path = hf.load_path(self.model_id, "encoder", self.kind)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype or hf.choose_dtype(device, self.settings.dtype)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.vlm = hf.load_pretrained(AutoModelForImageTextToText, path, self.model_id, "encoder", dtype=self.dtype)
        self.vlm.to(torch.device(device)).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.use_chat = bool(getattr(self.processor, "chat_template", None))
        self.analysis = AnalysisEncoder(device=device, settings=self.settings)

    @classmethod
    def check_available(cls, model: str | None) -> None:
        hf.require_model(model or DEFAULT_MODEL, "encoder", cls.kind)

    # -- captioning

    @staticmethod
    def _pil(image: DecodedImage):
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(image.rgb, dtype=np.uint8))

    def _inputs(self, images: Sequence[DecodedImage]) -> tuple[dict, int]:
        pil = [self._pil(im) for im in images]
        if self.use_chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_PROMPT}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            enc = self.processor(images=pil, text=[prompt] * len(pil), return_tensors="pt", padding=True)
            prompt_len = int(enc["input_ids"].shape[1])
        else:
            enc = self.processor(images=pil, return_tensors="pt")
            prompt_len = 0
        out = {}
        for key, value in enc.items():
            if hasattr(value, "to"):
                value = value.to(self.vlm.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out, prompt_len

    def caption(self, images: Sequence[DecodedImage]) -> list[str]:
        """Captions for a batch (one model call per ``batch_size`` images)."""
        from pixelrelay.pipeline.tiling import map_batches_with_oom

        return map_batches_with_oom(self._caption_batch, list(images), self.batch_size, what="captioner")

    def _caption_batch(self, images: Sequence[DecodedImage]) -> list[str]:
        import torch

        if not images:
            return []
        inputs, prompt_len = self._inputs(images)
        with torch.inference_mode():
            out = self.vlm.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        if prompt_len:
            out = out[:, prompt_len:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()).strip() for t in texts]

    def describe(self, images: Sequence[DecodedImage]) -> list[Description]:
        captions = self.caption(images)
        descriptions = self.analysis.describe(images)
        out = []
        for caption, desc in zip(captions, descriptions, strict=True):
            desc.caption = caption or None
            if caption:
                desc.text = f"{caption.rstrip('.')}. {desc.text}"
            out.append(desc)
        return out
