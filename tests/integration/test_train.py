"""Multi-process CPU DeepSpeed (gloo) runs of the tiny model on mixed image / text-only shards."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
from launch_helpers import common_args, free_port, losses_by_step

from trainer.cli.train import main
from trainer.run.checkpoint import checkpoint_root, read_state

RunCmd = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]


def test_plan_mixes_text_only_and_image_microbatches_across_ranks(mixed_shards: Path) -> None:
    """The runs below train steps where one rank's micro-batch has no image and the other's has."""
    from trainer.data import Planner, PlanSpec, load_catalog

    catalog = load_catalog([mixed_shards / "train"])
    plan = Planner(catalog, PlanSpec(weights=(1.0,), seed=6, max_tokens=56, packs_per_step=4)).plan(0)
    mixed = 0
    for step in range(2):  # every run below trains at least these steps
        has_image = [
            [bool(catalog.ref(i).image_grid_thw) for i in pack]
            for r in range(2)
            for pack in plan.rank_packs(step, r, 2)
        ]
        for m in range(2):  # micro-batch m of rank 0 vs rank 1
            if any(has_image[m]) != any(has_image[2 + m]):
                mixed += 1
    assert mixed >= 1


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


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr' in command line; did you mean 'optim.lr'?"),
        (["--schedule.global_batch_size", "3"], "global_batch_size 3 is not a multiple of"),
        (
            ["--schedule.global_batch_size", "4"],
            "global_batch_size 4 != micro_batch_size 1 * grad_accum_steps 2 * world size 1 = 2",
        ),
        (
            ["--dataset_args", "/nonexistent/shards"],
            "--dataset_args '/nonexistent/shards' in command line does not exist",
        ),
        (["--data.train", "/nonexistent/shards"], "data.train '/nonexistent/shards' has no index.json"),
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


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"global_batch_size": 4}, "was trained with a global batch of 4 rows, this run has 2"),
        (
            {"zero_stage": 3},
            "was trained with ZeRO-3, this run uses ZeRO-2; resume with the same --deepspeed",
        ),
    ],
)
def test_resume_that_changes_batch_or_zero_stage_is_one_line_before_any_process_group(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    saved: dict[str, int], expected: str,
) -> None:  # fmt: skip
    from trainer.run.checkpoint import commit

    ckpt_dir = checkpoint_root(tmp_path / "run") / "step-00000004"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "engine.pt").write_bytes(b"x")
    state = {"step": 4, "world_size": 2, "global_batch_size": 2, "zero_stage": 2, **saved}
    commit(ckpt_dir.parent, ckpt_dir.name, state)
    args = [*common_args(tiny_model_dir, mixed_shards, tmp_path / "run"), "--deepspeed", "zero2"]
    code = main([*args, "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err
    assert err.count("\n") == 1 and err.startswith("train: error: ")
    assert not dist.is_initialized()
