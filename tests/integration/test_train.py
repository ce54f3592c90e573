"""Multi-process CPU DeepSpeed (gloo) runs of the tiny model on mixed image / text-only shards."""

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

import pytest
import torch.distributed as dist

from trainer.checkpoint import STATE_FILE, checkpoint_root, read_state
from trainer.train import main

RunCmd = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        "--logging.tensorboard", "false", "--eval.at_end", "false", "--lr_scheduler_type", "constant",
        "--seed", "6",
    ]  # fmt: skip


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run appends to the same file)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") != "eval"}


def test_plan_mixes_text_only_and_image_microbatches_across_ranks(mixed_shards: Path) -> None:
    """The runs below train steps where one rank's micro-batch has no image and the other's has."""
    from trainer.data import Planner, PlanSpec, load_catalog

    catalog = load_catalog([mixed_shards / "train"])
    plan = Planner(catalog, PlanSpec(weights=(1.0,), seed=6, max_tokens=56, packs_per_step=4)).plan(0)
    mixed = 0
    for step in range(2):  # every run below trains at least these steps
        has_image = [
            [bool(catalog.refs[i].image_grid_thw) for i in pack]
            for r in range(2)
            for pack in plan.rank_packs(step, r, 2)
        ]
        for m in range(2):  # micro-batch m of rank 0 vs rank 1
            if any(has_image[m]) != any(has_image[2 + m]):
                mixed += 1
    assert mixed >= 1


@pytest.mark.slow
def test_zero2_two_ranks_full_lm_loss_goes_down(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, run_cmd: RunCmd
) -> None:
    out = tmp_path / "z2"
    args = [*common_args(tiny_model_dir, mixed_shards, out), "--deepspeed", "zero2", "--lora", "False"]
    args += ["--learning_rate", "1e-2", "--max_steps", "8", "--save_steps", "0", "--eval_steps", "4"]
    proc = run_cmd(torchrun_cmd(2, args))
    assert sorted(losses_by_step(out)) == list(range(1, 9))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") != "eval"]
    # The 1/t-weighted loss of 16 answer tokens is noisy; the plain CE per masked token is not.
    ce = [r["ce_per_masked"] for r in train]
    assert sum(ce[-2:]) / 2 < 0.8 * sum(ce[:2]) / 2, ce
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s", "mfu",
                "data_wait_fraction", "peak_memory_gib", "mean_t", "skipped_steps", "skipped_samples"):  # fmt: skip
        assert key in train[-1], key
    assert train[-1]["tokens_per_s"] == pytest.approx(2 * train[-1]["tokens_per_s_per_device"])
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [4, 8] and evals[-1]["nelbo"] < evals[0]["nelbo"]
    assert "masked_accuracy@0.5" in evals[-1]
    assert (out / "config.yaml").is_file() and json.loads((out / "ds_config.json").read_text())[
        "train_batch_size"
    ] == 4
    assert "train: done" in proc.stdout
    # The final checkpoint holds the trainable weights gathered for export.
    state = read_state(checkpoint_root(out) / "step-00000008")
    assert state is not None and state["world_size"] == 2 and state["data"]["step"] >= 0


@pytest.mark.slow
def test_zero3_lora_kill9_then_resume_equals_uninterrupted(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, run_cmd: RunCmd, launch_env: dict[str, str]
) -> None:
    base = [
        *common_args(tiny_model_dir, mixed_shards, tmp_path / "ref"),
        "--deepspeed",
        "zero3",
        "--lora",
        "True",
    ]
    base += ["--learning_rate", "1e-2", "--max_steps", "6", "--save_steps", "2", "--eval.every", "3"]
    run_cmd(torchrun_cmd(2, base))
    reference = losses_by_step(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 7))
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    # Held-out NELBO and masked accuracy under ZeRO-3 (the LM head is gathered outside forward).
    assert [r["step"] for r in evals] == [3, 6] and all(math.isfinite(r["nelbo"]) for r in evals)
    assert all(0.0 <= r["masked_accuracy@1"] <= 1.0 for r in evals)
    ce = [r["ce_per_masked"] for r in records if r.get("kind") != "eval"]
    assert sum(ce[-2:]) < sum(ce[:2]), ce  # LoRA under ZeRO-3 learns too

    out = tmp_path / "killed"
    args = [a if a != str(tmp_path / "ref") else str(out) for a in base]
    proc = subprocess.Popen(
        torchrun_cmd(2, args), cwd=REPO, env=launch_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        # Kill once step 2 is committed and step 3 has trained: mid-run, not at a save.
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and 3 in losses_by_step(out):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    root = checkpoint_root(out)
    committed = [p.name for p in sorted(root.iterdir()) if p.is_dir() and read_state(p) is not None]
    assert committed and committed[-1] in ("step-00000002", "step-00000004")
    resume_step = int(committed[-1].split("-")[1])
    # A newer checkpoint truncated mid-write (engine files cut short, no commit record) is ignored.
    broken = root / "step-00000005"
    shutil.copytree(root / committed[-1], broken)
    (broken / STATE_FILE).unlink()
    for path in broken.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])

    run_cmd(torchrun_cmd(2, [*args, "--resume", "auto"]))
    resumed = losses_by_step(out)
    for step in range(resume_step + 1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)


@pytest.mark.slow
def test_two_launchers_as_two_nodes_with_hostfile(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    """`deepspeed --hostfile F --no_ssh --node_rank 0|1` started side by side train one job."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "two-nodes"
    args = [*common_args(tiny_model_dir, mixed_shards, out), "--max_steps", "2", "--save_steps", "0"]
    port = str(free_port())
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    procs = [
        subprocess.Popen(
            [
                deepspeed,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "--no_local_rank",  # the `trainer` dispatcher takes the command first (see report)
                "--module",
                "trainer",
                "train",
                *args,
            ],
            cwd=REPO,
            env=launch_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert sorted(losses_by_step(out)) == [1, 2]
    state = read_state(checkpoint_root(out) / "step-00000002")
    assert state is not None and state["world_size"] == 2


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, launch_env: dict[str, str]
) -> None:
    out = tmp_path / "term"
    args = [*common_args(tiny_model_dir, mixed_shards, out), "--max_steps", "1000", "--save_steps", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", *args], cwd=REPO, env=launch_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and losses_by_step(out)):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by signal" in stderr
    summary = json.loads(stdout.split("train: done ", 1)[1].splitlines()[0])
    assert summary["stopped_early"] is True and 1 <= summary["step"] < 1000
    state = read_state(checkpoint_root(out) / f"step-{summary['step']:08d}")
    assert state is not None and state["step"] == summary["step"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr' in command line; did you mean 'optim.lr'?"),
        (["--schedule.global_batch_size", "3"], "global_batch_size 3 is not a multiple of"),
        (
            ["--schedule.global_batch_size", "4"],
            "global_batch_size 4 != micro_batch_size 1 * grad_accum_steps 2 * world size 1 = 2",
        ),
        (["--dataset_args", "/nonexistent/shards"], "data.train '/nonexistent/shards' has no index.json"),
        (
            ["--model_name_or_path", "/nonexistent/model"],
            "model.name_or_path '/nonexistent/model' is not a model folder",
        ),
        (["--resume", "auto"], "--resume auto found no committed checkpoint"),
    ],
)
def test_user_errors_are_one_line_before_any_process_group(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], expected: str,
) -> None:  # fmt: skip
    code = main([*common_args(tiny_model_dir, mixed_shards, tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("train: error: ")
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_plan_and_memory(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [*common_args(tiny_model_dir, mixed_shards, tmp_path / "run"), "--dry-run", "--num_train_epochs", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "world size: 1" in out and "steps per epoch: " in out and "memory estimate per device: ~" in out
    steps = int(out.split("steps per epoch: ")[1].split(";")[0])
    assert f"total steps: {2 * steps}" in out and steps > 0
    assert "max_tokens: 56" in out  # the resolved config
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
