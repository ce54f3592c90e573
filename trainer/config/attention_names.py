"""The one registry of attention backend names, read by config validation, model loading and
:mod:`trainer.model.attention` (torch-free, so the config imports it without importing torch)."""

from __future__ import annotations

import typing
from typing import Literal

Backend = Literal["sdpa", "eager", "flex", "flash"]
"""The type of a backend name."""
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
"""Names accepted as ``backend``."""

ALIASES: dict[str, str] = {
    **{name: name for name in BACKENDS},
    "flex_attention": "flex",
    "flash_attention_2": "flash",
    "flash_attn": "flash",
}
"""Every accepted spelling (ours and Hugging Face's) -> backend."""

AttnImplementation = Literal["auto", Backend]
"""The type of ``model.attn_implementation`` (``auto`` picks the best installed backend)."""
CONFIG_CHOICES: tuple[str, ...] = typing.get_args(AttnImplementation)
"""Values of ``model.attn_implementation``."""
