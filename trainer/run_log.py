"""What a run writes for people: metrics.jsonl and TensorBoard (rank 0), and throughput meters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard) on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self.tb: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: the JSON lines still carry everything
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON line and the numeric fields as TensorBoard scalars."""
        if not self.enabled or self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = int(record.get("step", 0))
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(prefix + key, value, step)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close."""
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


@dataclass
class Throughput:
    """Time, data wait, tokens, samples and FLOPs since the last log line."""

    seconds: float = 0.0
    wait_seconds: float = 0.0
    num_tokens: int = 0
    num_samples: int = 0
    flops: float = 0.0

    def add(
        self, seconds: float, wait_seconds: float, num_tokens: int, num_samples: int, flops: float
    ) -> None:
        """Count one step."""
        self.seconds += seconds
        self.wait_seconds += wait_seconds
        self.num_tokens += num_tokens
        self.num_samples += num_samples
        self.flops += flops

    def record(self, world_size: int, peak_flops: float | None) -> dict[str, Any]:
        """Rates of the interval for the log line; then the meter starts over."""
        seconds = max(self.seconds, 1e-9)
        record = {
            "tokens_per_s": self.num_tokens / seconds,
            "tokens_per_s_per_device": self.num_tokens / seconds / world_size,
            "samples_per_s": self.num_samples / seconds,
            "mfu": self.flops / seconds / world_size / peak_flops if peak_flops else None,
            "data_wait_fraction": self.wait_seconds / seconds,
        }
        self.seconds = self.wait_seconds = self.flops = 0.0
        self.num_tokens = self.num_samples = 0
        return record
