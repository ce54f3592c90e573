"""Tiny random Qwen3-VL models with the real vocabulary and special-token ids (tests, demo, benchmarks).

`python -m trainer make-tiny OUT_DIR` (trainer/cli/make_tiny.py) writes a complete model folder (config,
seeded random weights, tokenizer with chat template, image processor) that stock transformers loads offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from trainer.model.processor import QWEN3_VL_IMAGE_PROCESSOR, build_image_processor
from trainer.model.tokenizer import QWEN3_VL_CHAT_TEMPLATE, VOCAB_ROWS, build_qwen_tokenizer


def tiny_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    initializer_range: float = 0.02,
) -> Qwen3VLConfig:
    """A small but complete Qwen3-VL config with the real vocabulary and special-token ids.

    ``initializer_range`` is the std of the random text weights (embeddings included): with a
    frozen random embedding tied to the head, logits can only separate the 151,936 tokens if the rows
    are long enough (0.02 x sqrt(128) bounds a logit gap near 2.6; a trained Qwen's is far larger)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden size {hidden_size} must divide by heads {num_heads}, and heads by kv heads {num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim % 8:
        raise ValueError(f"head_dim = hidden/heads = {head_dim} must be a multiple of 8 for M-RoPE sections")
    half = head_dim // 2
    # Qwen3-VL splits the rotary half-dimension 24/20/20 of 64 between t/h/w; keep that proportion.
    mrope_h = mrope_w = half * 5 // 16
    mrope_section = [half - mrope_h - mrope_w, mrope_h, mrope_w]
    text_config = {
        "vocab_size": VOCAB_ROWS,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32_768,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": initializer_range,
        "bos_token_id": 151_643,
        "eos_token_id": 151_645,
        # No pad_token_id, as in the published configs: nn.Embedding would zero that row (and with
        # tied weights its logit), so <|endoftext|> could never be predicted.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 4,
        "num_heads": vision_heads,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": list(range(min(vision_depth, 3))),
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
    }
    return qwen3_vl_config(text_config, vision_config, tie_word_embeddings=True)


def qwen3_vl_config(
    text_config: dict[str, object], vision_config: dict[str, object], *, tie_word_embeddings: bool
) -> Qwen3VLConfig:
    """A ``Qwen3VLConfig`` of the given text and vision parts with Qwen's real vision token ids."""
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151_655,
        video_token_id=151_656,
        vision_start_token_id=151_652,
        vision_end_token_id=151_653,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model(*, seed: int = 0, **shape: float) -> Qwen3VLForConditionalGeneration:
    """A tiny random Qwen3-VL in memory (fp32, eval mode); `shape` as in `tiny_config`."""
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(tiny_config(**shape)).eval()


def make_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **shape: float,
) -> Path:
    """Write a tiny random Qwen3-VL folder (seeded: the same seed gives the same weights).

    ``min_pixels``/``max_pixels`` set the image processor's resize range (default Qwen3-VL's): the
    range the model's images are trained at, which `generate` and `data_tools build` then use."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_model(seed=seed, **shape).save_pretrained(out, safe_serialization=True)
    build_qwen_tokenizer().save_pretrained(out)
    size = dict(QWEN3_VL_IMAGE_PROCESSOR["size"])
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    build_image_processor(size=size).save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE, encoding="utf-8")
    return out
