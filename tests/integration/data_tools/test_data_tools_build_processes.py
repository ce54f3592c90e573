"""`build` with worker processes and a killed build process: byte-identical output either way.

Here, not in tests/unit, because they start processes and build hundreds of samples."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from launch_helpers import REPO, child_env

from data_tools import shards
from data_tools.__main__ import main as cli
from data_tools.index import read_index
from data_tools.synth import SynthSettings, run_synth, synth_build_settings


def _synth(out: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", "synth", "--output", str(out), "--model", str(model),
            "--no-progress", *extra]  # fmt: skip


@pytest.mark.slow
def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (the sample columns' folder included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reproducible_across_workers_and_readable(tmp_path: Path, tiny_model_dir: Path) -> None:
    build = dataclasses.replace(synth_build_settings(), samples_per_shard=50)
    settings = SynthSettings(num=120, num_test=20, tasks=("colour_en", "label_ko"), build=build)
    run_synth(tmp_path / "a", str(tiny_model_dir), settings, workers=1, progress=False)
    run_synth(tmp_path / "b", str(tiny_model_dir), settings, workers=2, progress=False)
    for split in ["train", "test"]:
        assert _files(tmp_path / "a" / split) == _files(tmp_path / "b" / split)
    train = tmp_path / "a" / "train"
    assert len(read_index(train)["shards"]) == 3
    with tarfile.open(train / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["train-000000000.json", "train-000000000.0.png"]
    rows = list(
        wds.WebDataset(sorted(str(p) for p in train.glob("shard-*.tar")), shardshuffle=False).decode("pil")
    )
    assert len(rows) == 120 and rows[5]["json"]["key"] == rows[5]["__key__"]
    assert rows[5]["0.png"].size == (64, 64) or rows[5]["0.png"].size == (128, 64)


@pytest.mark.slow
def test_killed_build_resumes_to_identical_output(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--num", "800", "--num-test", "10", "--samples-per-shard", "40"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_synth(out, tiny_model_dir, *args), env=child_env(), cwd=REPO)
    marker = out / "train" / ".build" / "shard-000002.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "train" / "index.json").exists(), "the build was not killed midway"
    problems = shards.verify(out / "train")
    assert problems and "not a complete shard set" in problems[0]
    # Leftovers like a half-written temp shard must not survive the resume.
    (out / "train" / ".shard-000099.tar.tmp-1").write_bytes(b"partial")
    resume = ["synth", "--model", str(tiny_model_dir), "--no-progress", *args]
    assert cli([*resume, "--output", str(out)]) == 0  # in-process from here on: no interpreter start-up
    assert shards.verify(out / "train") == [] and shards.verify(out / "test") == []
    clean = tmp_path / "clean"
    assert cli([*resume, "--output", str(clean)]) == 0
    assert _files(out / "train") == _files(clean / "train")
    # A third run finds the set complete and leaves it alone; other settings are refused.
    before = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    assert cli([*resume, "--output", str(out)]) == 0
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == before
    capsys.readouterr()
    assert cli([*resume, "--output", str(out), "--seed", "5"]) == 1
    assert "other settings" in capsys.readouterr().err
