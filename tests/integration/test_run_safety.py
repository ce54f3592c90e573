"""Runs never mix: a fresh run into another run's folder, a second live run on the same folder and a
resume that changes what the run computes are refused before any process group starts."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from launch_helpers import REPO, child_env, common_args, stopped_after

from data_tools.index import read_index, read_table
from trainer.cli.train import main
from trainer.config import load_config, to_dict
from trainer.run.checkpoint import RunLock, RunLockError, checkpoint_root, commit, latest_valid, read_state


def fake_checkpoint(output_dir: Path, step: int, config: dict[str, object] | None = None) -> Path:
    """A committed checkpoint folder (one engine file + the commit record) of another run."""
    ckpt_dir = checkpoint_root(output_dir) / f"step-{step:08d}"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "engine.pt").write_bytes(b"x")
    state = {"step": step, "world_size": 1, "global_batch_size": 2, "zero_stage": 2}
    if config is not None:
        state["config"] = config
    commit(ckpt_dir.parent, ckpt_dir.name, state)
    return ckpt_dir


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert not dist.is_initialized()
    return code, err


def test_fresh_run_into_another_runs_folder_is_refused(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    fake_checkpoint(out, 12)
    code, err = run_main(common_args(tiny_model_dir, mixed_shards, out), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "holds another run's checkpoints" in err
    assert "--resume_from_checkpoint auto" in err and "--overwrite_output_dir" in err


@pytest.mark.slow
def test_overwrite_output_dir_removes_the_old_run(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fake_checkpoint(out, 12)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 12, "loss": 1.0}) + "\n")
    args = [*common_args(tiny_model_dir, mixed_shards, out), "--max_steps", "1", "--overwrite_output_dir"]
    proc = train_once(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in sorted(checkpoint_root(out).glob("step-*"))] == ["step-00000001"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert latest_valid(checkpoint_root(out)) == checkpoint_root(out) / "step-00000001"
    assert not (out / ".run.lock").exists()  # released at the end


def test_resume_that_changes_the_computation_is_refused_unless_allowed(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = common_args(tiny_model_dir, mixed_shards, out)
    saved = to_dict(load_config(None, args))  # what the earlier run trained with
    fake_checkpoint(out, 4, saved)
    changed = [*args, "--resume", "auto", "--seed", "7", "--lora_r", "8"]
    code, err = run_main(changed, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "would change what the run computes (seed: 6 -> 7; lora.r: 16 -> 8)" in err
    assert "--allow_config_change" in err
    # Harmless changes (logging, evaluation and save cadence) pass; so does an allowed change.
    code, err = run_main(
        [*args, "--resume", "auto", "--logging.log_every", "3", "--save_steps", "9", "--dry-run"], capsys
    )
    assert code == 0, err
    assert "train: resuming with changed settings: " in err and "checkpoint.save_every: " in err
    code, err = run_main([*changed, "--allow_config_change", "--dry-run"], capsys)
    assert code == 0, err


def test_a_second_live_run_on_the_same_folder_fails_at_once_naming_the_holder(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        code, err = run_main([*common_args(tiny_model_dir, mixed_shards, out), "--max_steps", "1"], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over.
    lock = RunLock(out)
    lock.acquire()
    assert json.loads((out / ".run.lock").read_text())["pid"] != holder.pid
    with pytest.raises(RunLockError, match="in use by another run"):
        RunLock(out).acquire()
    lock.release()
    assert not (out / ".run.lock").exists()


def test_export_and_generate_take_the_committed_latest_checkpoint(tmp_path: Path) -> None:
    """The `latest` pointer wins over a higher step number (e.g. a checkpoint copied in by hand)."""
    out = tmp_path / "run"
    fake_checkpoint(out, 12)
    newer = fake_checkpoint(out, 4)  # committed after step 12: the pointer names it
    assert (checkpoint_root(out) / "latest").read_text() == newer.name
    assert latest_valid(checkpoint_root(out)) == newer
    (newer / "engine.pt").write_bytes(b"truncated!")  # damaged: the newest intact one is used
    assert read_state(newer) is None
    assert latest_valid(checkpoint_root(out)) == checkpoint_root(out) / "step-00000012"


def test_a_checkpoint_whose_trained_weights_changed_is_skipped_for_the_previous(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.run.checkpoint import WEIGHTS_FILE, find_resume

    out = tmp_path / "run"
    for step in (4, 8):
        ckpt_dir = checkpoint_root(out) / f"step-{step:08d}"
        ckpt_dir.mkdir(parents=True)
        (ckpt_dir / WEIGHTS_FILE).write_bytes(bytes([step]) * 64)
        commit(ckpt_dir.parent, ckpt_dir.name, {"step": step})
    newest = checkpoint_root(out) / "step-00000008"
    assert "trainable_sha256" in (read_state(newest) or {})
    (newest / WEIGHTS_FILE).write_bytes(bytes([9]) * 64)  # same size, other bytes: only the checksum sees it
    assert read_state(newest) is not None
    assert find_resume(out, "auto") == checkpoint_root(out) / "step-00000004"
    assert "fails its checksum" in capsys.readouterr().err


def train_once(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`python -m trainer train ARGS` in one process."""
    command = [sys.executable, "-m", "trainer", "train", *args]
    return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)


def corrupt_samples(tar: Path, samples: list[dict[str, int]]) -> None:
    """Overwrite the start of each sample's JSON member (same size: the index still matches)."""
    with open(tar, "r+b") as f:
        for sample in samples:
            f.seek(sample["offset"] + 512)
            f.write(b"\xff\x00garbage")


def copied_shards(mixed_shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(mixed_shards, out)
    return out


def test_shards_that_no_longer_match_their_index_are_refused_at_start(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = copied_shards(mixed_shards, tmp_path)
    tar = sorted((shards / "train").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-1024])
    code, err = run_main(common_args(tiny_model_dir, shards, tmp_path / "run"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"no longer matches its index.json ({tar.name} has" in err


def test_shards_of_another_tokenizer_are_refused_naming_both(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = copied_shards(mixed_shards, tmp_path)
    index = json.loads((shards / "test" / "index.json").read_text())
    index["tokenizer"].update(
        fingerprint="0123456789abcdef",
        files_sha256="fedcba9876543210",
        name_or_path="Qwen/Qwen2.5-VL-3B-Instruct",
    )
    (shards / "test" / "index.json").write_text(json.dumps(index))
    code, err = run_main(common_args(tiny_model_dir, shards, tmp_path / "run"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "built with the tokenizer of 'Qwen/Qwen2.5-VL-3B-Instruct' (fingerprint 0123456789ab)" in err
    assert f"model.name_or_path {str(tiny_model_dir)!r} has" in err


def test_the_tokenizer_check_loads_no_tokenizer_when_its_files_are_the_builds(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same tokenizer files as the build: no ~2 s tokenizer load per rank. Other files (here the same
    tokenizer saved again, reformatted): loaded once and compared by fingerprint, still accepted."""
    from data_tools import samples
    from trainer.config import load_config
    from trainer.run.preflight import check_shard_sets

    loads: list[str] = []
    real_load = samples.load_tokenizer
    monkeypatch.setattr(samples, "load_tokenizer", lambda path: loads.append(path) or real_load(path))
    config = load_config(None, common_args(tiny_model_dir, mixed_shards, tmp_path / "run"))
    check_shard_sets(config)
    assert loads == []
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer_config = model / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps(json.loads(tokenizer_config.read_text()), indent=4))
    check_shard_sets(load_config(None, common_args(model, mixed_shards, tmp_path / "run")))
    assert loads == [str(model)]


@pytest.mark.slow
def test_too_many_skipped_samples_stop_the_run_with_a_table(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    shards = copied_shards(mixed_shards, tmp_path)
    shard = read_index(shards / "train")["shards"][0]
    # The first sample stays intact: the start check passes.
    corrupt_samples(shards / "train" / shard["name"], read_table(shards / "train").shard_entries(0)[1:])
    args = [*common_args(tiny_model_dir, shards, tmp_path / "run"), "--max_steps", "20"]
    proc = train_once(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        "samples read were skipped by step" in proc.stderr and "data.max_skip_fraction = 0.001" in proc.stderr
    )
    assert re.search(rf"\d+  corrupt +{shard['name']}", proc.stderr)


def skip_counts(out: Path) -> dict[int, dict[str, int]]:
    """The ``skipped_samples`` metric of every step."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["skipped_samples"] for r in map(json.loads, lines) if r.get("kind") != "eval"}


@pytest.mark.slow
def test_a_resumed_run_continues_its_skipped_samples_and_skip_budget(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    """The skip counts belong to the run, not to the launch (trainer.run.run_state): resumed at step 3,
    the ``skipped_samples`` metric and the skip budget's counters go on from the checkpoint's and end
    where the uninterrupted run's end."""
    shards = copied_shards(mixed_shards, tmp_path)
    shard = read_index(shards / "train")["shards"][0]
    corrupt_samples(shards / "train" / shard["name"], read_table(shards / "train").shard_entries(0)[1::2])
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    args = ["--max_steps", "6", "--save_steps", "3", "--data.max_skip_fraction", "0.9"]
    proc = train_once([*common_args(tiny_model_dir, shards, reference), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped_after(reference, resumed, 3)
    proc = train_once([*common_args(tiny_model_dir, shards, resumed), *args, "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = skip_counts(reference)
    assert expected[3]["corrupt"] < expected[6]["corrupt"]  # skips before and after the resume
    assert skip_counts(resumed) == expected
    budget = ("samples_read", "samples_skipped", "skipped_by_reason", "skipped_where")
    final = [read_state(checkpoint_root(out) / "step-00000006") for out in (reference, resumed)]
    assert {key: final[1][key] for key in budget} == {key: final[0][key] for key in budget}
    at_resume = read_state(checkpoint_root(resumed) / "step-00000003")
    assert 0 < at_resume["samples_skipped"] < final[0]["samples_skipped"] < final[0]["samples_read"]


@pytest.mark.slow
def test_a_corrupt_held_out_sample_is_skipped_and_counted_not_fatal(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    shards = copied_shards(mixed_shards, tmp_path)
    shard = read_index(shards / "test")["shards"][0]
    corrupt_samples(shards / "test" / shard["name"], read_table(shards / "test").shard_entries(0)[1:2])
    out = tmp_path / "run"
    args = [*common_args(tiny_model_dir, shards, out), "--max_steps", "1", "--eval.at_end", "true"]
    proc = train_once(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out samples skipped: {'corrupt': 1}" in proc.stderr
    evals = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]
    assert evals and evals[-1]["skipped_samples"] == {"corrupt": 1}
