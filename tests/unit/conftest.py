"""Fixtures for the unit tests (the tiny model folder comes from tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def data_tools_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model folder's tokenizer (the real Qwen vocabulary and the Qwen3-VL chat template)."""
    from data_tools.samples import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _write_text_rows(path: Path, num: int, prefix: str = "t") -> None:
    rows = [
        {
            "id": f"{prefix}{i}",
            "messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}"}],
        }
        for i in range(num)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def write_text_rows() -> Callable[..., None]:
    """`write_text_rows(path, num, prefix="t")`: a JSONL file of `num` one-turn text conversations
    with ids `{prefix}0`, `{prefix}1`, ... (questions `q{i}?`, answers `a{i}`)."""
    return _write_text_rows
