"""What a run writes for people: metrics.jsonl, TensorBoard and wandb (rank 0), and throughput meters."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_tools.fileio import atomic_write_text
from trainer.config import LoggingConfig

WANDB_ID_FILE = "wandb_run_id"
"""In output_dir: the wandb run id, so that a resumed training run continues the same wandb run."""


class MetricsWriter:
    """metrics.jsonl, plus the ``logging.report_to`` backends, on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        logging: LoggingConfig,
        run_config: dict[str, Any] | None = None,
        resuming: bool = False,
    ) -> None:
        """``run_config``: the resolved config, shown by wandb; ``resuming``: this launch continues the
        run in ``output_dir`` from a checkpoint (and so continues its wandb run)."""
        self.enabled = enabled
        self.file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self.tb: Any = None
        self.wandb: Any = None
        if enabled and "tensorboard" in logging.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: the JSON lines still carry everything
                self.tb = None
        if enabled and "wandb" in logging.report_to:
            self.wandb = start_wandb(output_dir, logging, run_config, resuming)

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON line; the numeric fields also go to TensorBoard and wandb at the record's step."""
        if not self.enabled or self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record.get("step", 0))
        prefix = "eval/" if record.get("kind") == "eval" else "train/"
        scalars = {
            prefix + key: value
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
        }
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

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
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a run's metrics.jsonl, a build's rejects.jsonl)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def start_wandb(
    output_dir: Path, logging: LoggingConfig, run_config: dict[str, Any] | None, resuming: bool
) -> Any:
    """A wandb run logging into ``output_dir/wandb``. A resumed training run continues the wandb run whose
    id ``output_dir`` holds; a fresh one (also after --overwrite_output_dir) starts a new wandb run."""
    import wandb

    id_file = output_dir / WANDB_ID_FILE
    if resuming and id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(8)
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(
        project=logging.wandb_project or None,
        dir=str(output_dir),
        name=logging.run_name or output_dir.resolve().name,
        config=run_config,
        id=run_id,
        resume="allow",
    )


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
