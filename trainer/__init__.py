"""Qwen3-VL masked diffusion (MDLM) trainer.

Importing this package imports neither deepspeed nor torch.distributed; only the training run
(``trainer.run``: the loop, checkpointing and the distributed helpers) does. ``load_mdlm_model``,
``LoadedModel`` and ``TrainOutput`` come from :mod:`trainer.api` when first used; its ``train`` is
imported from there (``from trainer.api import train``); the training loop is :mod:`trainer.run.loop`.

Rooms, lowest first (a module imports only its own room or lower ones; docs/CONTRACTS.md, Layout):
``config`` < ``model`` < ``data`` < ``run`` < ``inference`` < ``cli`` / ``api`` / ``demo``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LoadedModel", "TrainOutput", "load_mdlm_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
