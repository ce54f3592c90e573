"""PEFT trainable tokens for the `<|mask|>` row: a forward that never materialises the [V, H] matrix,
and PEFT wrapping without the warnings that do not apply to MDLM (`trainer.model` assembles both)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["quiet_peft_wrapping", "use_sparse_trainable_tokens"]


def _sparse_forward(
    layer: nn.Module, x: torch.Tensor, active_adapters: Any, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """PEFT ``TrainableTokensLayer`` forward without materialising the merged weight matrix.

    Stock PEFT rebuilds the whole [V, H] matrix with ``index_copy`` on every call of the embedding and
    of the tied LM head (311M elements on Qwen3-VL-2B, and a dense [V, H] weight gradient behind
    it). Here the embedding takes its base rows from the frozen layer and the few trained rows (the
    ``<|mask|>`` embedding) where they are used; the tied head uses the base rows only."""
    if layer.disable_adapters or not active_adapters or layer.merged:
        return layer._stock_forward_adapters(x, active_adapters, *args, **kwargs)
    base = layer.base_layer
    result = base(x)
    if not isinstance(base, nn.Embedding):
        # The LM head tied to the embedding keeps its base columns: the trained row is <|mask|>,
        # whose logit is never predicted (-inf before every softmax). This also keeps the head off
        # the embedding's delta parameter, which ZeRO-3 does not gather for the head.
        return result
    for adapter in active_adapters:
        indices = layer.token_indices[adapter]
        delta = layer.trainable_tokens_delta[adapter].to(result.dtype)
        scale = layer._get_embed_scale()
        if scale is not None:
            delta = delta * scale.to(delta.dtype)
        for row, token_id in enumerate(indices):
            result = torch.where((x == token_id)[..., None], delta[row], result)
    return result


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Silence two warnings PEFT raises on every wrap of a Qwen3-VL model that do not apply here:
    the <|mask|> row trains in the input embedding only, and the tied head's <|mask|> row is never
    used (its logit is -inf), so leaving the head untied to the delta is what MDLM wants; and PEFT
    itself reads transformers' deprecated `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Model has `tie_word_embeddings=True`", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def use_sparse_trainable_tokens(model: nn.Module) -> None:
    """Route every PEFT ``TrainableTokensLayer`` of ``model`` through the sparse forward above."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not hasattr(module, "_stock_forward_adapters"):
            module._stock_forward_adapters = module.forward_adapters
            module.forward_adapters = _sparse_forward.__get__(module)
