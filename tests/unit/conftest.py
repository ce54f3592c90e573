"""Fixtures for the data_tools unit tests (the tiny model folder comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def data_tools_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model folder's tokenizer (the real Qwen vocabulary and the Qwen3-VL chat template)."""
    from data_tools.samples import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
