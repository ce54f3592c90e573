"""Process-group setup and cross-rank agreement.

Every control-flow decision of the loop (skip a non-finite step, stop on a signal or a time limit)
goes through ``agree_any`` so that all ranks take it together and no collective can hang.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config.launch_env import env_rank, env_world_size  # noqa: F401  (distributed.env_rank() as before)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node (the GPU index)."""
    device: torch.device
    """cuda:LOCAL_RANK on GPU machines, cpu otherwise."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the only rank that writes shared files and logs)."""
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the one helper: trainer, demo and tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def setup(timeout_s: float = 600.0) -> DistInfo:
    """Start the process group: NCCL on GPUs, gloo on CPU; a plain ``python`` run becomes world size 1.

    ``timeout_s`` bounds every collective: a rank waiting for a dead peer fails instead of hanging."""
    import deepspeed  # only the loop imports deepspeed (docs/CONTRACTS.md, Layout: pure parts stay pure)

    # DeepSpeed's ZeRO gathers call torch's deprecated all_gather_into_tensor: one FutureWarning per
    # rank and run that says nothing about the job (the deprecation is DeepSpeed's to follow).
    warnings.filterwarnings(
        "ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning
    )
    if "RANK" not in os.environ:
        # Plain `python -m trainer train`: a one-process job on a private port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Several ranks share the cores: one thread each (ZeRO-3 steps are 5-10x slower otherwise).
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo", verbose=False, timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown() -> None:
    """After a run that ended well: wait for every rank, then destroy the process group (so a
    Python-API caller can run again in the same process). Never call it on an error path: a peer
    may be dead or inside another collective (docs/DESIGN.md §9)."""
    if dist.is_initialized():
        dist.barrier()
        import deepspeed.comm
        from deepspeed.utils import groups

        # DeepSpeed's destroy also drops the groups DeepSpeed cached (a clone of the world group):
        # torch's alone leaves them dangling, and the next run in this process fails on them.
        deepspeed.comm.destroy_process_group()
        groups._WORLD_GROUP = None  # DeepSpeed < 0.19.8 keeps that clone past its own destroy


def _reduce_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_reduce_sum(values: list[float] | torch.Tensor) -> list[float]:
    """Sum numbers over all ranks in one collective (float64, so counts stay exact). A tensor (sums
    kept on the device) is reduced where it lies under NCCL and read back once, with the result."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.tolist()
    tensor = tensor.to(_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a list of numbers over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(v) for v in tensor.tolist()]


def agree_any(*flags: bool) -> list[bool]:
    """For each flag: True on every rank if it is True on any rank."""
    return [v > 0 for v in all_reduce_max([1.0 if f else 0.0 for f in flags])]


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_counter(counter: Counter[str]) -> dict[str, int]:
    """Sum a per-rank Counter of skip reasons over all ranks."""
    local = dict(counter)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    total: dict[str, int] = {}
    for part in gathered:
        for reason, count in part.items():
            total[reason] = total.get(reason, 0) + int(count)
    return total
