"""Integration fixtures: tiny shard sets with image and text-only samples, and a launcher helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from launch_helpers import child_env

REPO = Path(__file__).resolve().parents[2]


def _forget_deepspeed_accelerator() -> None:
    """DeepSpeed keeps the accelerator it detected first: drop it, so the next user detects again."""
    detection = sys.modules.get("deepspeed.accelerator.real_accelerator")
    if detection is not None:
        detection.ds_accelerator = None


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every integration test runs on the CPU, so a GPU machine runs them unchanged: processes they
    launch see no GPU (child_env, and what inherits this environment), and a run in this process
    (the Python API) takes the CPU path even after tests/gpu used the GPU here."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _forget_deepspeed_accelerator()
    yield
    _forget_deepspeed_accelerator()  # a GPU test after this one finds CUDA again


def _text_rows(num: int, split: str) -> list[dict[str, Any]]:
    """Text-only conversations (no image): ranks then get text-only and image rows in the same step."""
    words = ["alpha", "beta", "gamma", "delta"]
    rows = []
    for i in range(num):
        word = words[i % len(words)]
        rows.append(
            {
                "id": f"text-{split}-{i:05d}",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": f"Repeat the word {word}."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": word}]},
                ],
                "images": [],
            }
        )
    return rows


def build_mixed_shards(out: Path, model_dir: Path, num_image: int, num_text: int, num_test: int) -> Path:
    """`out/train` and `out/test` shard sets built by data_tools (synthetic shapes + text-only rows)."""
    from data_tools.build import run_build
    from data_tools.settings import BuildSettings
    from data_tools.sources import Source
    from data_tools.synth import make_rows

    # The demo set's build settings, spelled out rather than taken from synth: the golden-loss
    # test needs exactly these shards even if synth's defaults move.
    settings = BuildSettings(
        min_pixels=64 * 64,
        max_pixels=128 * 128,
        image_format="png",
        samples_per_shard=500,
        answer_padding="fixed",
        pad_answer_to=8,
        pad_tokens="eos",
        seed=0,
    )
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, n_img, n_txt in (("train", num_image, num_text), ("test", num_test, num_test // 2)):
        images = make_rows(n_img, ["colour_en", "shape_en"], 0, split)
        texts = _text_rows(n_txt, split)
        # Interleave so that packs (and so ranks) mix both kinds.
        rows: list[dict[str, Any]] = []
        for i in range(max(len(images), len(texts))):
            rows += images[i : i + 1] + texts[i : i + 1]
        splits[split] = rows
    source = Source(spec="test", container="synth", row_format="records", splits=splits, base_dir=None)
    run_build(source, out, str(model_dir), settings, 1, progress=False, force_split_dirs=True)
    return out


@pytest.fixture(scope="session")
def mixed_shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard directory with `train/` (48 image + 24 text-only samples) and `test/` (12 + 6)."""
    return build_mixed_shards(tmp_path_factory.mktemp("mixed-shards"), tiny_model_dir, 48, 24, 12)


@pytest.fixture
def launch_env() -> dict[str, str]:
    """The environment for launched ranks (see child_env)."""
    return child_env()


@pytest.fixture
def run_cmd() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command from the repo root with the child environment; fail the test with its output."""

    def _run(cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        # Own session: on a timeout (a hang) the launcher and all its ranks are killed together.
        popen = subprocess.Popen(
            cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\n{stdout[-3000:]}\n{stderr[-6000:]}")
        if check and popen.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {popen.returncode}\n{stdout[-4000:]}\n{stderr[-6000:]}")
        return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)

    return _run
