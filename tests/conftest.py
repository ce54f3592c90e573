"""Shared fixtures: the tiny random Qwen3-VL folder with the real Qwen tokenizer, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: tests run beside DeepSpeed ranks on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `make-tiny` model folder (text hidden 64, 2 layers; vision hidden 32, depth 2), seed 0."""
    from trainer.model.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-qwen3vl"), seed=0)
