"""The one registry of attention backend names, read by config validation, model loading and
:mod:`trainer.model.attention` (torch-free, so the config imports it without importing torch)."""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("sdpa", "eager", "flex", "flash")
"""Names accepted as ``backend``."""

ALIASES: dict[str, str] = {
    **{name: name for name in BACKENDS},
    "flex_attention": "flex",
    "flash_attention_2": "flash",
    "flash_attn": "flash",
}
"""Every accepted spelling (ours and Hugging Face's) -> backend."""

CONFIG_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
"""Values of ``model.attn_implementation`` (``auto`` picks the best installed backend)."""
