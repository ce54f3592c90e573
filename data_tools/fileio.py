"""Crash-safe small-file writes: a reader sees the old content or the whole new content, never a part;
and the file helpers every writer shares (`fsync_dir`, `fsync_file`, `file_sha256`).

The temporary name (`.NAME.tmp-PID`, in the same folder so that `os.replace` is a rename within one
filesystem) contains `.tmp-`, which `build` removes on resume and `verify` reports as a leftover.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """The name `path` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort where a folder cannot be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems / platforms do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file already written and closed to the disk (before a record that lists it is written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`: temporary file in the same folder, flush + fsync, rename, fsync the folder."""
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8 (bytes as written, no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))
