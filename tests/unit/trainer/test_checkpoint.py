"""Checkpoint commit protocol: commit record last, manifest check, pointer, keep_last, resume lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.run.checkpoint import (
    POINTER_FILE,
    STATE_FILE,
    ResumeError,
    checkpoint_root,
    commit,
    find_resume,
    latest_valid,
    read_state,
    tag_for,
)


def _write_engine_files(root: Path, step: int) -> Path:
    """What every rank's DeepSpeed save leaves behind before rank 0 commits."""
    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    (ckpt / "trainable.safetensors").write_bytes(b"w" * 50)
    return ckpt


def _save(output: Path, step: int, keep_last: int = 0) -> Path:
    root = checkpoint_root(output)
    _write_engine_files(root, step)
    return commit(root, tag_for(step), {"step": step, "data": {"epoch": 0, "step": step}}, keep_last)


def test_commit_writes_state_last_and_moves_pointer(tmp_path: Path) -> None:
    ckpt = _save(tmp_path, 10)
    state = read_state(ckpt)
    assert state is not None and state["step"] == 10 and state["tag"] == "step-00000010"
    assert set(state["manifest"]) == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainable.safetensors",
    }
    assert (checkpoint_root(tmp_path) / POINTER_FILE).read_text() == "step-00000010"
    assert find_resume(tmp_path, "auto") == ckpt


def test_half_written_checkpoint_is_skipped(tmp_path: Path) -> None:
    first = _save(tmp_path, 10)
    # Killed mid-save: engine files written, no commit record.
    _write_engine_files(checkpoint_root(tmp_path), 20)
    assert find_resume(tmp_path, "auto") == first
    # Committed but a shard truncated afterwards (disk full, partial copy): also skipped.
    second = _save(tmp_path, 30)
    assert find_resume(tmp_path, "auto") == second
    shard = second / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:10])
    assert read_state(second) is None
    assert find_resume(tmp_path, "auto") == first
    # Asking for the damaged one by path is an error, not a silent fallback.
    with pytest.raises(ResumeError, match="damaged or half-written"):
        find_resume(tmp_path, str(second))
    # A corrupt commit record is the same as none.
    (first / STATE_FILE).write_text("{not json")
    assert latest_valid(checkpoint_root(tmp_path)) is None


def test_keep_last_prunes_old_and_abandoned(tmp_path: Path) -> None:
    for step in (10, 20):
        _save(tmp_path, step, keep_last=2)
    _write_engine_files(checkpoint_root(tmp_path), 25)  # abandoned half-written save
    _save(tmp_path, 30, keep_last=2)
    names = sorted(p.name for p in checkpoint_root(tmp_path).iterdir() if p.is_dir())
    assert names == ["step-00000020", "step-00000030"]


def test_resume_modes(tmp_path: Path) -> None:
    assert find_resume(tmp_path, "") is None
    with pytest.raises(ResumeError, match="found no committed checkpoint"):
        find_resume(tmp_path, "auto")
    with pytest.raises(ResumeError, match="does not exist"):
        find_resume(tmp_path, str(tmp_path / "nope"))
    ckpt = _save(tmp_path, 5)
    assert find_resume(tmp_path / "elsewhere", str(ckpt)) == ckpt  # one checkpoint by path
    assert find_resume(tmp_path / "elsewhere", str(tmp_path)) == ckpt  # a run directory
    assert find_resume(tmp_path / "elsewhere", str(checkpoint_root(tmp_path))) == ckpt
