"""Tiny, randomly initialised Hugging Face models of the real classes, saved like hub repos.

No network: tokenizers and processors are built here. Each ``make_*`` writes a folder that
``from_pretrained`` (and so every pixelrelay backend) loads exactly as it loads a hub id
from the cache. Weights are seeded, so a folder is the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Text the tiny BPE is trained on: enough for merges that look like a real vocabulary.
_CORPUS = [
    'You plan image restoration. {"degradation": "noise", "deblock": 0.25, "denoise": 0.5, '
    '"deblur": 0, "sharpen": 0.75, "scale": 2, "prompt": "a clean sharp photo of a cat", '
    '"negative_prompt": "blur, noise, jpeg artifacts"}',
    "a photo of a dog on a couch, high resolution, natural detail, realistic texture",
    "Caption: Measurements: noise sigma blur sigma JPEG quality Instruction: Task: upscale restore",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ; : ! ? ( ) [ ] { }",
]
BLIP_WORDS = (
    "a an the of on in with and photo picture image cat dog man woman street car tree sky "
    "house table people sitting standing red blue green white black small large old near"
).split()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def make_qwen2_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen's special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = bpe.get_vocab()
    import json

    state = json.loads(bpe.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=dict(model),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def make_tiny_qwen2(path: str | Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Qwen2ForCausalLM (2 layers, hidden 32) + a ChatML tokenizer, saved to ``path``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tok = make_qwen2_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok) + 4,  # like the real model: embeddings a little wider than the vocab
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    _seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    # Like Qwen2.5-Instruct's generation_config: sampling on by default. The planner must
    # override it (greedy, no repetition penalty).
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_blip_tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", ".", ","] + BLIP_WORDS
    vocab_file = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(vocab_file))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def make_tiny_blip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """BlipForConditionalGeneration (1-layer ViT + 1-layer text decoder) + BlipProcessor."""
    import shutil
    import tempfile

    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = Path(path)
    vocab_dir = Path(tempfile.mkdtemp(prefix="blip-vocab-"))
    try:
        tok = make_blip_tokenizer(vocab_dir)
    finally:
        shutil.rmtree(vocab_dir, ignore_errors=True)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=32,
    )
    _seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
    )
    processor.save_pretrained(path)
    return path


def make_tiny_swin2sr(
    path: str | Path,
    upscale: int = 2,
    seed: int = 0,
    window_size: int = 4,
    embed_dim: int = 12,
    depths: tuple[int, ...] = (2,),
    upsampler: str = "pixelshuffle",
) -> Path:
    """Swin2SRForImageSuperResolution (one stage of 2 layers, window 4) + its processor."""
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution, Swin2SRImageProcessor

    path = Path(path)
    config = Swin2SRConfig(
        image_size=64,
        patch_size=1,
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=[2] * len(depths),
        window_size=window_size,
        mlp_ratio=2.0,
        upscale=upscale,
        upsampler=upsampler,
        img_range=1.0,
        resi_connection="1conv",
    )
    _seed(seed)
    model = Swin2SRForImageSuperResolution(config).eval()
    model.save_pretrained(path)
    Swin2SRImageProcessor(size_divisor=window_size).save_pretrained(path)
    return path


def make_clip_tokenizer():
    """A CLIP BPE tokenizer over single byte-level characters (no merges), built offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def make_tiny_sd_upscaler(path: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionUpscalePipeline with tiny random UNet/VAE/CLIP (needs diffusers)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    path = Path(path)
    tok = make_clip_tokenizer()
    _seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=True,
        num_class_embeds=351,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,  # VAE tiling (on by default in the decoder) only above this
        scaling_factor=0.08333,
    )
    text_encoder = _tiny_clip_text_encoder(tok)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=350,
    )
    pipe.save_pretrained(path)
    return path


def _tiny_clip_text_encoder(tok):
    """A tiny random CLIP text encoder for ``tok`` (the Stable Diffusion pipelines' one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tok),
            max_position_embeddings=32,
            projection_dim=16,
        )
    )


def _tiny_sd_parts(seed: int, in_channels: int = 4, sample_size: int = 16) -> dict:
    """Tiny random UNet / VAE (x2 latents) / CLIP text encoder + tokenizer of the classes a
    Stable Diffusion 1.x pipeline holds. Native size: ``sample_size`` x 2 pixels."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tok = make_clip_tokenizer()
    _seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    text_encoder = _tiny_clip_text_encoder(tok)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet)


def make_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion 1.x text-to-image pipeline saved as the hub repo is
    (``StableDiffusionPipeline``, no safety checker); ``sd-img2img`` loads it for img2img
    through ``AutoPipelineForImage2Image``. Native size 32 px."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        **_tiny_sd_parts(seed),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def make_tiny_instruct_pix2pix(path: str | Path, seed: int = 0) -> Path:
    """A tiny random ``StableDiffusionInstructPix2PixPipeline`` (UNet with 8 input channels:
    noise latents + image latents; Euler ancestral, as timbrooks/instruct-pix2pix ships)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    path = Path(path)
    pipe = StableDiffusionInstructPix2PixPipeline(
        **_tiny_sd_parts(seed, in_channels=8),
        scheduler=EulerAncestralDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


# --- sharing across test modules ---------------------------------------------------------

_BUILT: dict[tuple, Path] = {}


def tiny_model(tmp_path_factory, builder, name: str, **kwargs) -> Path:
    """Build a tiny model once per test session (cached by builder + arguments)."""
    key = (builder.__name__, name, tuple(sorted(kwargs.items())))
    if key not in _BUILT:
        _BUILT[key] = builder(tmp_path_factory.mktemp("hf-models") / name, **kwargs)
    return _BUILT[key]


def install_in_hub_cache(folder: str | Path, cache_dir: str | Path, repo_id: str, commit: str = "0" * 40) -> Path:
    """Lay ``folder`` out in ``cache_dir`` exactly as the hub downloader does
    (models--org--name/{refs/main, snapshots/<commit>/...}), so ``repo_id`` resolves from
    the cache without any network."""
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
