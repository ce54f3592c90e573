"""One rank fails, the job ends: under torchrun and the deepspeed launcher, within 60 s, non-zero, with
the failing rank's traceback printed once and prefixed by its rank (a plain python run is one process:
its error is its exit, and the same code path prints it).

The failure is injected from outside the trainer: `fail_site/sitecustomize.py` (on PYTHONPATH) makes
one rank's third optimizer step raise."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launch_helpers import REPO, child_env, common_args, free_port, processes_naming, torchrun_cmd

SITE = Path(__file__).with_name("fail_site")


def run_to_the_end(
    command: list[str], env: dict[str, str], timeout: float
) -> tuple[subprocess.Popen[str], str]:
    """Run a launch in its own session until it ends by itself (killing its whole tree if it does not
    within ``timeout``); returns the process and its stderr."""
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    tree = psutil.Process(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        for child in tree.children(recursive=True) if proc.poll() is None else []:
            child.kill()
        proc.kill()
    return proc, stderr


def launcher(kind: str, args: list[str]) -> list[str]:
    if kind == "torchrun":
        return torchrun_cmd(2, args)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [
        deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--module", "trainer", "train", *args,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_one_rank_raises_and_every_process_is_gone_within_60_s(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, kind: str
) -> None:
    failing_rank = "1"
    env = child_env()
    env["PYTHONPATH"] = str(SITE) + os.pathsep + env["PYTHONPATH"]
    stamp = tmp_path / "failed_at"
    env.update(MDLM_TEST_FAIL_RANK=failing_rank, MDLM_TEST_FAIL_AT="3", MDLM_TEST_FAIL_STAMP=str(stamp))
    args = [
        *common_args(tiny_model_dir, mixed_shards, tmp_path / "run"),
        "--max_steps",
        "50",
        "--save_steps",
        "0",
    ]
    proc, stderr = run_to_the_end(launcher(kind, args), env, timeout=120)
    ended = time.time()
    assert proc.returncode != 0
    seconds = ended - float(stamp.read_text())
    print(f"{kind}: every process gone {seconds:.1f} s after the error")
    assert seconds < 60, seconds
    message = f"[rank {failing_rank}] RuntimeError: injected failure on rank {failing_rank}"
    assert stderr.count(message) == 1, stderr[-4000:]
    assert f"[rank {failing_rank}] train: error" in stderr
    leftovers = processes_naming(tmp_path)
    assert not leftovers, leftovers


@pytest.mark.slow
def test_a_peer_that_stops_answering_is_bounded_by_the_timeout_and_named(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    """Rank 1 freezes (SIGSTOP) entering a collective: rank 0 waits there until distributed.timeout_s,
    fails with an error naming the collective and the step, and torchrun ends the job."""
    env = child_env()
    env["PYTHONPATH"] = str(Path(__file__).with_name("hang_site")) + os.pathsep + env["PYTHONPATH"]
    stamp = tmp_path / "hung_at"
    env.update(
        MDLM_TEST_HANG_RANK="1", MDLM_TEST_HANG_AT="12", MDLM_TEST_HANG_STAMP=str(stamp),
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT="3",
    )  # fmt: skip
    args = [
        *common_args(tiny_model_dir, mixed_shards, tmp_path / "run"),
        "--max_steps",
        "50",
        "--save_steps",
        "0",
    ]
    proc, stderr = run_to_the_end(torchrun_cmd(2, [*args, "--distributed.timeout_s", "5"]), env, timeout=150)
    seconds = time.time() - float(stamp.read_text())
    print(f"frozen peer: every process gone {seconds:.1f} s after it stopped answering (timeout 5 s)")
    assert proc.returncode != 0
    assert seconds < 5 + 60, seconds
    assert "[rank 0] train: error" in stderr, stderr[-4000:]
    assert "[rank 0] after optimizer step " in stderr, stderr[-4000:]
    assert "Timed out waiting 5000ms" in stderr  # the collective (gloo) says what it waited for
