"""Special tokens: their spellings (one place, shared with data_tools) and id lookups that fail loudly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_tools.samples import ENDOFTEXT, IM_END, IMAGE_PAD, MASK_TOKEN, RAINBOW_PADS

IM_START = "<|im_start|>"
VISION_START = "<|vision_start|>"

__all__ = [
    "ENDOFTEXT",
    "IMAGE_PAD",
    "IM_END",
    "IM_START",
    "MASK_TOKEN",
    "VISION_START",
    "SpecialTokens",
    "answer_pad_ids",
    "token_id",
]


def token_id(tokenizer: Any, text: str) -> int:
    """The id of a special token; a ValueError naming it when the tokenizer does not know it."""
    found = tokenizer.convert_tokens_to_ids(text)
    if found is None or (found == getattr(tokenizer, "unk_token_id", None) and text != tokenizer.unk_token):
        hint = ": load the tokenizer through trainer.model" if text == MASK_TOKEN else ""
        raise ValueError(f"the tokenizer has no {text} token{hint}")
    return int(found)


def answer_pad_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids `data_tools build --answer-padding` pads answers with (`<|endoftext|>`, the rainbow's)."""
    return tuple(token_id(tokenizer, text) for text in (ENDOFTEXT, *RAINBOW_PADS))


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids and vision settings generation needs (read from tokenizer and model config)."""

    mask: int
    """`<|mask|>`: the canvas token; never predicted."""
    eos: int
    """`<|im_end|>`: ends the answer."""
    pad: int
    """`<|endoftext|>`: padding between rows of a batch."""
    image: int
    """`<|image_pad|>`: positions that receive image embeddings."""
    vision_start: int
    """`<|vision_start|>`: needed for M-RoPE ids."""
    spatial_merge_size: int
    """Vision merge factor (2 on Qwen3-VL): needed for M-RoPE ids."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, model_config: Any) -> SpecialTokens:
        """Ids from a tokenizer with `<|mask|>` and a `Qwen3VLConfig` (never hard-coded numbers)."""
        return cls(
            mask=token_id(tokenizer, MASK_TOKEN),
            eos=token_id(tokenizer, IM_END),
            pad=token_id(tokenizer, ENDOFTEXT),
            image=int(model_config.image_token_id),
            vision_start=int(model_config.vision_start_token_id),
            spatial_merge_size=int(model_config.vision_config.spatial_merge_size),
        )
