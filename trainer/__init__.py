"""Qwen3-VL masked diffusion (MDLM) trainer.

Importing this package imports neither deepspeed nor torch.distributed; only the training loop,
checkpointing and the distributed helpers do. ``load_mdlm_model``, ``LoadedModel`` and ``TrainOutput``
come from :mod:`trainer.api` when first used; its ``train`` is imported from there
(``from trainer.api import train``), because ``trainer.run.loop`` names the training-loop module.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedModel", "TrainOutput", "load_mdlm_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
