"""`inspect` (table, histogram, plot), `verify` exit codes, shard size limits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_tools.__main__ import main as cli
from data_tools.index import read_index, shard_samples
from data_tools.report import histogram


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("synth")
    argv = ["synth", "--output", str(out), "--model", str(tiny_model_dir), "--num", "40", "--num-test", "8"]
    assert cli([*argv, "--tasks", "all", "--max-shard-bytes", "8000", "--no-progress"]) == 0
    return out


def test_max_shard_bytes_splits_shards(synth_dir: Path) -> None:
    assert len(read_index(synth_dir / "train")["shards"]) > 3
    for _, samples in shard_samples(synth_dir / "train"):
        members = sum(s["num_bytes"] for s in samples)
        assert members <= 8000 or len(samples) == 1


def test_inspect_prints_table_histogram_and_plot(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "lengths.png"
    assert cli(["inspect", str(synth_dir), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "samples" in out and "p95" in out and "train" in out and "test" in out and "#" in out
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_verify_exit_codes(synth_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert cli(["verify", str(synth_dir), "--model", str(tiny_model_dir)]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(synth_dir / "test", broken)
    shard = broken / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # flip a byte inside the first sample's JSON
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(broken)]) == 1


def test_histogram() -> None:
    text = histogram([1, 2, 2, 3, 10], num_bins=3, width=10)
    assert text.splitlines()[0].split()[1] == "4" and histogram([]) == "(no samples)"
