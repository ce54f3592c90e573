"""What the launcher (deepspeed / torchrun / Slurm) announced in the environment: rank and world size.

Torch-free, so the data room (``trainer.data.dataset_cache``) and the dry run read them without the
process-group code; ``trainer.run.distributed`` re-exports them.
"""

from __future__ import annotations

import os


def env_rank() -> int:
    """Global rank announced by the launcher, 0 for a plain process."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size announced by the launcher (deepspeed / torchrun / Slurm), 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))
