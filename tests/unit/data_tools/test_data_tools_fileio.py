"""Atomic small-file writes: whole content in place, no temporary file left, failures leave the old file."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools import fileio


def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    fileio.atomic_write_text(path, "old\n")
    fileio.atomic_write_bytes(path, "새 내용\n".encode())
    assert path.read_bytes() == "새 내용\n".encode()
    fileio.atomic_write_text(path, "a\r\nb")  # bytes as given: no newline translation
    assert path.read_bytes() == b"a\r\nb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    assert ".tmp-" in fileio.temporary_path(path).name and fileio.temporary_path(path).parent == tmp_path


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "rejects.jsonl"
    fileio.atomic_write_text(path, "kept\n")
    with pytest.raises(UnicodeEncodeError):
        fileio.atomic_write_text(path, "\ud800")  # a lone surrogate cannot be encoded
    assert path.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejects.jsonl"]
    fileio.fsync_dir(tmp_path / "missing")  # best effort: a folder that cannot be opened is no error
