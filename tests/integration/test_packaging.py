"""A non-editable install works outside the repository: the DeepSpeed templates travel as package data
and the console scripts run the commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import REPO, child_env


@pytest.mark.slow
def test_a_wheel_installed_outside_the_repository_trains_with_a_template(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source"  # the build writes build/ and *.egg-info next to its sources
    for name in ("trainer", "data_tools", "ds_configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("qwen3vl_mdlm-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    assert sorted(p.name for p in (site / "ds_configs").glob("*.json")) == [
        "zero2.json", "zero3.json", "zero3_offload.json",
    ]  # fmt: skip
    env = child_env()
    env["PYTHONPATH"] = str(site)  # the installed copy only, not the checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*command: str | Path) -> str:
        proc = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    where = run(
        sys.executable, "-c", "import trainer, ds_configs; print(trainer.__file__, ds_configs.__file__)"
    )
    assert all(Path(p).is_relative_to(site) for p in where.split()), where
    args = [
        "--model_name_or_path", tiny_model_dir, "--dataset_args", mixed_shards, "--output_dir", tmp_path / "run",
        "--data.max_tokens", "56", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
    ]  # fmt: skip
    for stage in ("2", "3"):
        out = run(site / "bin" / "qwen3vl-mdlm", "train", *args, "--deepspeed", f"zero{stage}", "--dry-run")
        assert f"zero stage: {stage};" in out, out[-2000:]
    assert "build" in run(site / "bin" / "qwen3vl-mdlm-data", "--help")
