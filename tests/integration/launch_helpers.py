"""Command lines and metrics readers shared by the integration tests."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import psutil

from trainer.run.checkpoint import POINTER_FILE, checkpoint_root, read_state
from trainer.run.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """Environment of launched ranks: on the CPU (gloo, the CPU's golden losses, also on a GPU
    machine), one thread each, offline, repo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
        CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    """`torchrun --nproc_per_node N -m trainer train ARGS` on a private port."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "trainer", "train", *args,
    ]  # fmt: skip


def common_args(model: Path, shards: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_args", str(shards), "--output_dir", str(out),
        "--data.max_tokens", "56", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
        "--data.num_workers", "0", "--logging.progress", "false", "--logging.log_every", "1",
        "--logging.report_to", "none", "--eval.at_end", "false", "--lr_scheduler_type", "constant",
        "--seed", "6",
    ]  # fmt: skip


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run appends to the same file)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") != "eval"}


def stopped_after(reference: Path, out: Path, step: int) -> Path:
    """``reference``'s output folder as a run that committed ``step`` and ended there: the later
    checkpoints and metrics are removed (what a run stopped by ``exit_after_steps`` leaves; it saves
    a launch per test)."""
    shutil.copytree(reference, out)
    root = checkpoint_root(out)
    for ckpt in root.iterdir():
        if ckpt.is_dir() and ckpt.name.startswith("step-") and int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (root / POINTER_FILE).write_text(f"step-{step:08d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))
    assert read_state(root / f"step-{step:08d}") is not None
    return out


def processes_naming(path: Path) -> list[psutil.Process]:
    """Processes whose command line names ``path`` (launchers, ranks, their loader workers): none may
    be left once a job has ended."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(path) in " ".join(p.info["cmdline"] or ())]
