"""scripts/train.slurm.sh with stand-in `srun`/`scontrol`: a requeued job resumes, and torchrun gets
the grace time asked of Slurm before it SIGKILLs the ranks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("restarts", ["0", "1"])
def test_requeued_job_resumes_and_ranks_get_the_grace_time(tmp_path: Path, restarts: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A long host list: a script that reads only the first line (`| head -n 1` under pipefail) would
    # kill scontrol with SIGPIPE and end the job with status 141 (seen in CI with two hosts, by chance).
    (bin_dir / "scontrol").write_text("#!/bin/sh\nfor i in $(seq -w 1 20000); do echo node-$i; done\n")
    # srun runs the task command through bash -c: print what each task would exec, and its grace time.
    (bin_dir / "srun").write_text('#!/bin/sh\necho "grace=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\necho "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[01-02]",
        "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": restarts,
    }  # fmt: skip
    out = subprocess.run(
        ["bash", "scripts/train.slurm.sh", "--config", "configs/qwen3vl-2b-ko-doc.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "grace=280" in out
    assert "-m trainer train --config configs/qwen3vl-2b-ko-doc.yaml" in out
    assert "--rdzv_endpoint=node-00001:29500" in out
    assert ("--resume auto" in out) == (restarts == "1")
