"""Resumes that must equal an uninterrupted run: ZeRO-3 + LoRA across saves and evaluations, and
resumes at another world size (2 ranks -> 1 and 1 -> 2) for ZeRO-2 and ZeRO-3, LoRA and full LM.

Every run uses a warmup + cosine schedule, evaluates in the middle and at the end, and compares
losses, learning rates and held-out NELBO with the uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import child_env, common_args, free_port, processes_naming, stopped_after, torchrun_cmd

from trainer.run.checkpoint import (
    STATE_FILE,
    UNIVERSAL_DIR,
    WEIGHTS_FILE,
    checkpoint_root,
    read_state,
)

RunCmd = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 12
REL = 1e-5


def run_args(
    model: Path, shards: Path, out: Path, deepspeed: str, lora: bool, ranks: int, total: int = TOTAL_STEPS
) -> list[str]:
    """A ``total``-step schedule (warmup 3, cosine to 0.1) with saves every 4 steps and evaluations in
    the middle and at the end.

    The global batch is 4 rows of one micro-batch each, whatever the world size (grad accumulation
    absorbs it), so the noise of every micro-batch is the same at 1 and 2 ranks."""
    args = common_args(model, shards, out)
    args[args.index("--lr_scheduler_type") + 1] = "cosine"
    args[args.index("--gradient_accumulation_steps") + 1] = str(4 // ranks)
    return [
        *args, "--warmup_steps", "3", "--schedule.min_lr_ratio", "0.1", "--learning_rate", "1e-2",
        "--deepspeed", deepspeed, "--lora", str(lora), "--save_steps", "4", "--eval.every", str(total // 2),
        "--eval.at_end", "true", "--max_steps", str(total),
    ]  # fmt: skip


def launch(ranks: int, args: list[str]) -> list[str]:
    """One plain process for world size 1, else torchrun."""
    if ranks == 1:
        return [sys.executable, "-m", "trainer", "train", *args]
    return torchrun_cmd(ranks, args)


def records(out: Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """The last logged train record of every step, and the held-out NELBO of every evaluation."""
    train: dict[int, dict[str, Any]] = {}
    nelbo: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            nelbo[record["step"]] = record["nelbo"]
        else:
            train[record["step"]] = record
    return train, nelbo


def assert_equal_runs(resumed: Path, reference: Path, from_step: int, total: int = TOTAL_STEPS) -> None:
    """Loss and learning rate of every step after ``from_step`` and every NELBO equal the reference."""
    train, nelbo = records(resumed)
    ref_train, ref_nelbo = records(reference)
    assert sorted(train) == list(range(1, total + 1))
    for step in range(from_step + 1, total + 1):
        for key in ("loss", "lr"):
            assert train[step][key] == pytest.approx(ref_train[step][key], rel=REL), (step, key)
    assert sorted(ref_nelbo) == [total // 2, total] and sorted(nelbo) == sorted(ref_nelbo)
    for step, value in ref_nelbo.items():
        assert nelbo[step] == pytest.approx(value, rel=REL), step
    # The schedule really warms up and decays (a restarted scheduler would not match above).
    lrs = [ref_train[s]["lr"] for s in sorted(ref_train)]
    assert lrs[0] < lrs[1] < lrs[2] == max(lrs) and lrs[-1] < lrs[len(lrs) // 2] < max(lrs)


def check_two_rank_run(out: Path, stdout: str, total: int = TOTAL_STEPS) -> None:
    """What an uninterrupted 2-rank run logs and commits, and that it learns."""
    train, nelbo = records(out)
    last = train[total]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "mfu",
                "data_wait_fraction", "peak_memory_gib", "mean_t", "skipped_steps", "skipped_samples"):  # fmt: skip
        assert key in last, key
    assert last["tokens_per_s"] == pytest.approx(2 * last["tokens_per_s_per_device"])
    # The 1/t-weighted loss of a few answer tokens is noisy; the plain CE per masked token is not.
    ce = [train[s]["ce_per_masked"] for s in sorted(train)]
    assert sum(ce[-3:]) < sum(ce[:3]), ce
    assert all(math.isfinite(v) for v in nelbo.values())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["masked_accuracy@1"] <= 1.0 for r in evals if r.get("kind") == "eval")
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "ds_config.json").read_text())["train_batch_size"] == 4
    assert "train: done" in stdout
    # The final checkpoint holds the trainable weights gathered for export.
    state = read_state(checkpoint_root(out) / f"step-{total:08d}")
    assert state is not None and state["world_size"] == 2 and state["data"]["step"] >= 0
    assert (checkpoint_root(out) / f"step-{total:08d}" / WEIGHTS_FILE).is_file()


@pytest.fixture(scope="module")
def zero3_lora_runs(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The uninterrupted 2-rank ZeRO-3 + LoRA run (every checkpoint kept) and its first 4 steps."""
    root = tmp_path_factory.mktemp("z3-lora")
    reference = root / "reference"
    args = [
        *run_args(tiny_model_dir, mixed_shards, reference, "zero3", True, 2),
        "--checkpoint.keep_last",
        "0",
    ]
    proc = subprocess.run(
        launch(2, args), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_two_rank_run(reference, proc.stdout)  # LoRA under ZeRO-3 learns, evaluates, commits
    return {"reference": reference, "first4": stopped_after(reference, root / "first4", 4)}


def start_and_wait_for_step(command: list[str], out: Path, step: int, capture: bool) -> subprocess.Popen[str]:
    """Start a launch in its own process group and return once ``step`` is logged (still running)."""
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        command, cwd=REPO, env=child_env(), stdout=output, stderr=subprocess.STDOUT if capture else output,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and step in records(out)[0]:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before step {step} could be interrupted"
    return proc


def resume_copy(first4: Path, out: Path) -> Path:
    """A fresh output folder holding the first run's committed step-4 checkpoint and metrics."""
    shutil.copytree(first4, out)
    assert read_state(checkpoint_root(out) / "step-00000004") is not None
    return out


@pytest.mark.slow
def test_zero3_lora_resume_saves_and_evaluates_like_uninterrupted(
    zero3_lora_runs: dict[str, Path],
    tiny_model_dir: Path,
    mixed_shards: Path,
    tmp_path: Path,
    run_cmd: RunCmd,
) -> None:
    """4 steps, then a resume to 12 that saves at 8 and 12 and evaluates at 6 and 12 (the run that crashed,
    with prefetching on, as shipped: the fix does not depend on switching it off)."""
    out = resume_copy(zero3_lora_runs["first4"], tmp_path / "resumed")
    args = run_args(tiny_model_dir, mixed_shards, out, "zero3", True, 2)
    proc = run_cmd(torchrun_cmd(2, [*args, "--resume", "auto"]))
    assert "train: done" in proc.stdout
    assert_equal_runs(out, zero3_lora_runs["reference"], from_step=4)
    for step in (8, 12):
        assert read_state(checkpoint_root(out) / f"step-{step:08d}") is not None


@pytest.mark.slow
def test_zero3_lora_resume_two_ranks_to_one(
    zero3_lora_runs: dict[str, Path],
    tiny_model_dir: Path,
    mixed_shards: Path,
    tmp_path: Path,
    run_cmd: RunCmd,
) -> None:
    out = resume_copy(zero3_lora_runs["first4"], tmp_path / "resumed")
    args = [*run_args(tiny_model_dir, mixed_shards, out, "zero3", True, 1), "--resume", "auto"]
    proc = run_cmd(launch(1, [*args, "--checkpoint.keep_last", "0"]))
    assert "(written by 2 ranks) at world size 1 through DeepSpeed's universal checkpoint" in proc.stderr
    assert_equal_runs(out, zero3_lora_runs["reference"], from_step=4)
    assert (checkpoint_root(out) / "step-00000004" / UNIVERSAL_DIR / "zero").is_dir()
    assert read_state(checkpoint_root(out) / "step-00000012")["world_size"] == 1  # type: ignore[index]
    # The resumed run's checkpoint exports as a stock PEFT adapter.
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "trainer",
            "export",
            "--checkpoint",
            str(out),
            "--output",
            str(tmp_path / "adapter"),
        ]
    )
    assert "step-00000012" in proc.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("deepspeed", "lora", "ranks_before", "ranks_after", "extra"),
    [
        ("zero2", False, 2, 1, []),
        ("zero3", False, 1, 2, ["--model.freeze_merger", "false"]),
    ],
    ids=["zero2-full-2to1", "zero3-full-merger-1to2"],
)
def test_resume_at_another_world_size_equals_uninterrupted(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, run_cmd: RunCmd,
    deepspeed: str, lora: bool, ranks_before: int, ranks_after: int, extra: list[str],
) -> None:  # fmt: skip
    total = 8  # 4 steps, then 4 more at the other world size
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    args = [*run_args(tiny_model_dir, mixed_shards, reference, deepspeed, lora, ranks_before, total), *extra]
    proc = run_cmd(launch(ranks_before, args))
    if ranks_before == 2:
        check_two_rank_run(reference, proc.stdout, total)
        _, nelbo = records(reference)
        assert nelbo[total] < nelbo[total // 2]  # the whole language model learns fast
    stopped_after(reference, out, 4)
    after = [*run_args(tiny_model_dir, mixed_shards, out, deepspeed, lora, ranks_after, total), *extra]
    run_cmd(launch(ranks_after, [*after, "--resume", "auto"]))
    assert_equal_runs(out, reference, from_step=4, total=total)
    state = read_state(checkpoint_root(out) / f"step-{total:08d}")
    assert state is not None and state["world_size"] == ranks_after


# launcher, what stops the run (a signal to the launcher's process group, or the time limit), workers
STOPS = {
    "deepspeed-SIGTERM-2-workers": ("deepspeed", signal.SIGTERM, 2),
    "torchrun-SIGINT-1-worker": ("torchrun", signal.SIGINT, 1),
    "torchrun-time-limit-2-workers": ("torchrun", None, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stopped_run_with_loader_workers_commits_and_resumes_exactly(
    stop: str,
    zero3_lora_runs: dict[str, Path],
    tiny_model_dir: Path,
    mixed_shards: Path,
    tmp_path: Path,
    run_cmd: RunCmd,
) -> None:
    """What Slurm's scancel and Kubernetes send (SIGTERM to every process of the job, the loader
    workers too), Ctrl-C (SIGINT to the foreground group) and ``schedule.time_limit_s``: every rank
    checkpoints at the same step, no worker dies of the signal, every process of the job ends, and the
    resumed run skips a newer half-written checkpoint and continues with the reference losses."""
    launcher, sig, workers = STOPS[stop]
    out = tmp_path / "stopped"
    args = [
        *run_args(tiny_model_dir, mixed_shards, out, "zero3", True, 2),
        "--data.num_workers",
        str(workers),
    ]
    if launcher == "deepspeed":
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        command = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   "--module", "trainer", "train", *args]  # fmt: skip
    else:
        command = torchrun_cmd(2, args)
    if sig is None:
        # Counted from the trainer's start, so a busy machine still stops it well before step 12.
        command += ["--schedule.time_limit_s", "1"]
        proc = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        output, why = proc.stdout + proc.stderr, "time limit"
    else:
        proc = start_and_wait_for_step(command, out, 5, capture=True)
        try:
            signalled = time.time()
            os.killpg(proc.pid, sig)
            output, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert time.time() - signalled < 60
        why = "signal"
    # torchrun prints its own traceback for the signal it got; a rank's error would say "train: error".
    assert "DataLoader worker" not in output and "train: error" not in output, output[-3000:]
    assert f"stopped by {why} at step" in output, output[-3000:]
    assert not processes_naming(out)
    stopped_at = int(output.split(f"stopped by {why} at step ")[1].split(";")[0])
    assert 0 < stopped_at < TOTAL_STEPS
    root = checkpoint_root(out)
    state = read_state(root / f"step-{stopped_at:08d}")
    assert state is not None and state["step"] == stopped_at
    # A newer checkpoint cut short mid-write (engine files truncated, no commit record), as a crash
    # during a later save leaves it, is ignored.
    broken = root / f"step-{stopped_at + 1:08d}"
    shutil.copytree(root / f"step-{stopped_at:08d}", broken)
    (broken / STATE_FILE).unlink()
    for path in broken.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    run_cmd(torchrun_cmd(2, [*args, "--resume", "auto"]))
    assert_equal_runs(out, zero3_lora_runs["reference"], from_step=stopped_at)
