"""FLOPs per optimizer step and MFU: one documented formula (:func:`step_flops`), real tokens only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.model import MDLMModel

PEAK_TFLOPS_BF16: dict[str, float] = {
    # Dense bf16 tensor-core peak per device (no sparsity); MFU is reported against it.
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
}


@dataclass(frozen=True)
class FlopsModel:
    """Sizes that the FLOPs-per-token formula needs (read from the model config)."""

    num_lm_matmul_params: int
    """Parameters of the language model's linear layers (attention + MLP, no embeddings)."""
    num_layers: int
    """Language-model layers."""
    q_dim: int
    """Query heads * head dim (attention score/value matmul width)."""
    hidden: int
    """Hidden size (LM head input)."""
    vocab: int
    """LM head rows."""
    num_vision_params: int
    """Vision tower parameters (forward only while frozen)."""
    lora: bool
    """Frozen base with adapters (no weight gradients for the base)."""


def step_flops(
    fm: FlopsModel, num_tokens: int, sum_sq_doc_len: int, num_masked: int, num_vision_tokens: int
) -> float:
    """Model FLOPs of one optimizer step (forward + backward, no recomputation).

    Linear layers: forward 2N per token; backward 2N for activation gradients plus 2N for weight
    gradients only when the base is trained (6N full, 4N frozen base + LoRA; the adapters' own
    FLOPs are ~r/hidden of that and left out). Attention scores and values: 4 * q_dim * n^2 per
    layer forward for a document of n tokens (bidirectional: every pair), x3 with backward. The LM
    head runs only on masked positions (2 * hidden * vocab per token forward, x3 or x2 with
    backward). The frozen vision tower: forward only, 2 * params per patch token.
    """
    per_token = 4 if fm.lora else 6
    linear = per_token * fm.num_lm_matmul_params * num_tokens
    attention = 12 * fm.num_layers * fm.q_dim * sum_sq_doc_len
    head = per_token * fm.hidden * fm.vocab * num_masked
    vision = 2 * fm.num_vision_params * num_vision_tokens
    return float(linear + attention + head + vision)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU (None when unknown, e.g. on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            # fp32 matmuls run on TF32 tensor cores at half the bf16 rate.
            return tflops * 1e12 * (0.5 if precision == "fp32" else 1.0)
    return None


def sum_sq_doc_len(seq_ids_BL: torch.Tensor) -> int:
    """Sum over packed documents of their squared length (the attention cost of a batch)."""
    total = 0
    for row in seq_ids_BL:
        counts = torch.bincount(row[row >= 0])
        total += int((counts.long() ** 2).sum())
    return total


def flops_model(model: MDLMModel, lora: bool) -> FlopsModel:
    """Sizes for ``step_flops`` from the assembled model."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q_dim = text.num_attention_heads * head_dim
    kv_dim = text.num_key_value_heads * head_dim
    per_layer = text.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * text.hidden_size * text.intermediate_size
    return FlopsModel(
        num_lm_matmul_params=per_layer * text.num_hidden_layers,
        num_layers=text.num_hidden_layers,
        q_dim=q_dim,
        hidden=text.hidden_size,
        vocab=text.vocab_size,
        num_vision_params=model.parameter_counts()["vision"],
        lora=lora,
    )
