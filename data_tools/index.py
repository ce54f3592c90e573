"""A shard set's index: a small `index.json` summary and per-sample columns in memory-mappable `.npy` files.

Layout (docs/CONTRACTS.md, "Shard set"): `index.json` holds the build settings, totals and one entry
per shard; the per-sample fields live in `DIR/columns-<hash>/NAME.npy`, one flat array per field, so
every rank (and every DataLoader worker) maps the same pages instead of parsing one Python object per
sample. The column folder is named by the hash of its contents and written before `index.json`, which
names it: a reader that finds `index.json` always finds the columns it describes, and a rewrite (an
upgrade, a rebuild) never changes a folder a running reader may still map.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.errors import BuildError
from data_tools.fileio import atomic_write_text, fsync_dir, temporary_path

__all__ = [
    "COLUMNS_PREFIX",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "INDEX_VERSION",
    "SampleTable",
    "TableBuilder",
    "make_index",
    "read_index",
    "read_table",
    "shard_samples",
    "upgrade_index",
    "write_index",
]

INDEX_FORMAT = "qwen3vl-mdlm-shards"
INDEX_VERSION = 2
INDEX_NAME = "index.json"
COLUMNS_PREFIX = "columns-"
UPGRADE_HINT = "python -m data_tools upgrade-index"


@dataclass
class SampleTable:
    """The per-sample fields of one shard set, as flat arrays in (shard, position) order."""

    key: np.ndarray
    """[N] bytes (`S<width>`): the sample keys (ASCII, `[A-Za-z0-9_-]+`)."""
    offset: np.ndarray
    """[N] int64: byte offset of the sample's first tar header in its shard."""
    num_bytes: np.ndarray
    """[N] int64: bytes spanned by the sample's members."""
    num_tokens: np.ndarray
    """[N] int32: len(input_ids)."""
    num_answer_tokens: np.ndarray
    """[N] int32: target tokens."""
    image_start: np.ndarray
    """[N+1] int64: sample i's image grids are rows image_start[i]:image_start[i+1] of image_grid_thw."""
    image_grid_thw: np.ndarray
    """[I, 3] int32: the grids of all images (in 16-px patches), in sample order."""
    shard_start: np.ndarray
    """[S+1] int64: the samples of shard s are image rows shard_start[s]:shard_start[s+1] (from the
    `num_samples` of index.json's shard entries; not a file)."""

    def __len__(self) -> int:
        return len(self.num_tokens)

    def shard_of(self, i: int) -> int:
        """The shard (position in index.json's `shards`) holding sample `i`."""
        return int(np.searchsorted(self.shard_start, i, side="right")) - 1

    def key_of(self, i: int) -> str:
        return bytes(self.key[i]).decode("ascii")

    def grids(self, i: int) -> tuple[tuple[int, int, int], ...]:
        """Image grids of sample `i`, as `((t, h, w), ...)`."""
        rows = self.image_grid_thw[self.image_start[i] : self.image_start[i + 1]]
        return tuple((int(t), int(h), int(w)) for t, h, w in rows)

    def entry(self, i: int) -> dict[str, Any]:
        """Sample `i` as one JSON-able dict (the fields `write_shard` reports per sample)."""
        grids = [list(g) for g in self.grids(i)]
        return {
            "key": self.key_of(i),
            "offset": int(self.offset[i]),
            "num_bytes": int(self.num_bytes[i]),
            "num_tokens": int(self.num_tokens[i]),
            "num_answer_tokens": int(self.num_answer_tokens[i]),
            "num_images": len(grids),
            "image_grid_thw": grids,
        }

    def shard_entries(self, shard: int) -> list[dict[str, Any]]:
        """The sample dicts of one shard, in tar order (for checks that read every sample anyway)."""
        return [self.entry(i) for i in range(int(self.shard_start[shard]), int(self.shard_start[shard + 1]))]

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every sample dict, in order."""
        return (self.entry(i) for i in range(len(self)))


# Column name -> dtype of the stored array (`key`'s width is the longest key's).
_COLUMN_DTYPES = {
    "offset": np.int64,
    "num_bytes": np.int64,
    "num_tokens": np.int32,
    "num_answer_tokens": np.int32,
    "image_start": np.int64,
    "image_grid_thw": np.int32,
}
_COLUMNS = ["key", *_COLUMN_DTYPES]


def _shard_starts(shards: list[dict[str, Any]]) -> np.ndarray:
    """[S+1] int64: where each shard's samples start in the table (from index.json's shard entries)."""
    starts = np.zeros(len(shards) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([int(s["num_samples"]) for s in shards])
    return starts


class TableBuilder:
    """Collects shard entries (as `data_tools.shards.write_shard` returns them) into a `SampleTable`
    and the per-shard summary of index.json, one shard at a time: a shard's sample dicts become arrays
    when it is added, so ten million samples never live as Python objects at once."""

    def __init__(self) -> None:
        self.shards: list[dict[str, Any]] = []
        self._chunks: dict[str, list[np.ndarray]] = {name: [] for name in _COLUMNS}
        self._num_samples = 0
        self._num_images = 0

    def add_shard(self, entry: dict[str, Any]) -> None:
        samples = entry["samples"]
        grids = [g for s in samples for g in s["image_grid_thw"]]
        counts = np.array([len(s["image_grid_thw"]) for s in samples], dtype=np.int64)
        self._chunks["key"].append(np.array([s["key"].encode("ascii") for s in samples], dtype=np.bytes_))
        for name in ("offset", "num_bytes", "num_tokens", "num_answer_tokens"):
            self._chunks[name].append(np.array([s[name] for s in samples], dtype=_COLUMN_DTYPES[name]))
        # Image starts are global: this shard's counts continue after every image seen so far.
        self._chunks["image_start"].append(self._num_images + np.cumsum(counts) - counts)
        self._chunks["image_grid_thw"].append(np.array(grids, dtype=np.int32).reshape(-1, 3))
        self._num_samples += len(samples)
        self._num_images += len(grids)
        self.shards.append(
            {
                "name": entry["name"],
                "num_bytes": int(entry["num_bytes"]),
                "sha256": entry["sha256"],
                "num_samples": len(samples),
            }
        )

    def finish(self) -> SampleTable:
        def joined(name: str) -> np.ndarray:
            chunks = self._chunks[name]
            if name == "key":
                width = max((c.dtype.itemsize for c in chunks), default=1)
                return np.concatenate(chunks).astype(f"S{width}") if chunks else np.zeros(0, "S1")
            if name == "image_grid_thw":
                return np.concatenate(chunks) if chunks else np.zeros((0, 3), np.int32)
            return (
                np.concatenate(chunks).astype(_COLUMN_DTYPES[name])
                if chunks
                else np.zeros(0, _COLUMN_DTYPES[name])
            )

        columns = {name: joined(name) for name in _COLUMNS}
        columns["image_start"] = np.append(columns["image_start"], self._num_images).astype(np.int64)
        shard_start = _shard_starts(self.shards)
        return SampleTable(**columns, shard_start=shard_start)


def make_index(
    shard_entries: Iterable[dict[str, Any]],
    tokenizer_info: dict[str, Any],
    build: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], SampleTable]:
    """The `index.json` summary and the sample table of a shard set, from its shard entries (consumed
    one at a time); `extra` adds top-level keys to the summary."""
    builder = TableBuilder()
    for entry in shard_entries:
        builder.add_shard(entry)
    table = builder.finish()
    index: dict[str, Any] = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "tokenizer": tokenizer_info}
    index["build"] = build
    index.update(
        num_samples=len(table),
        num_tokens=int(table.num_tokens.sum(dtype=np.int64)),
        num_images=len(table.image_grid_thw),
    )
    index["shards"] = builder.shards
    if extra:
        index.update(extra)
    return index, table


def _write_columns(directory: Path, table: SampleTable) -> str:
    """Write the table's columns into a content-named folder (if not already there); return its name."""
    staging = temporary_path(directory / "columns")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a crashed writer with this pid
    staging.mkdir()
    digest = hashlib.sha256()
    for name in _COLUMNS:
        array = np.ascontiguousarray(getattr(table, name))
        with open(staging / f"{name}.npy", "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    fsync_dir(staging)
    folder = COLUMNS_PREFIX + digest.hexdigest()[:16]
    if (directory / folder).is_dir():
        shutil.rmtree(staging)  # the same content is already there (a rewrite of an unchanged table)
    else:
        os.rename(staging, directory / folder)
        fsync_dir(directory)
    return folder


def write_index(directory: str | os.PathLike[str], index: dict[str, Any], table: SampleTable) -> None:
    """Write the columns, then `DIR/index.json` atomically (the last file of a build: its presence
    marks the set complete), then remove column folders no longer named. Sets `index["columns"]`."""
    directory = Path(directory)
    index["columns"] = _write_columns(directory, table)
    atomic_write_text(directory / INDEX_NAME, json.dumps(index, ensure_ascii=False, indent=1) + "\n")
    for stale in directory.glob(COLUMNS_PREFIX + "*"):
        if stale.name != index["columns"]:
            shutil.rmtree(stale, ignore_errors=True)


def _load_json(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {directory} is not a complete shard set (build it, or re-run build)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run the build") from e


def read_index(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check `DIR/index.json` (the summary; `read_table` has the samples). Raises
    `ValueError` with the fix when it is absent, invalid, or an older version."""
    directory = Path(directory)
    index = _load_json(directory)
    path = directory / INDEX_NAME
    if index.get("format") == INDEX_FORMAT and index.get("version") == 1:
        raise ValueError(
            f"{path} is a version-1 index (one JSON object per sample; slow to load at scale): "
            f"upgrade it in place with `{UPGRADE_HINT} {directory}` (the tars stay as they are)"
        )
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} v{index.get('version')!r} is not "
            f"{INDEX_FORMAT!r} v{INDEX_VERSION}; rebuild with this version of data_tools"
        )
    return index


def read_table(directory: str | os.PathLike[str], index: dict[str, Any] | None = None) -> SampleTable:
    """The sample table of a shard set, memory-mapped (pages are read on use and shared between
    processes). Raises `ValueError` when the columns are missing or disagree with index.json."""
    directory = Path(directory)
    index = read_index(directory) if index is None else index
    folder = directory / str(index.get("columns", ""))
    columns: dict[str, np.ndarray] = {}
    try:
        for name in _COLUMNS:
            columns[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{directory}: the sample columns index.json names ({folder.name}) are unreadable ({e}); "
            "restore the folder or rebuild the shard set"
        ) from e
    shard_start = _shard_starts(index["shards"])
    table = SampleTable(**columns, shard_start=shard_start)
    n = len(table)
    lengths_ok = all(len(columns[name]) == n for name in ("key", "offset", "num_bytes", "num_answer_tokens"))
    if not lengths_ok or len(table.image_start) != n + 1 or n != shard_start[-1] or n != index["num_samples"]:
        raise ValueError(
            f"{directory}: the sample columns ({folder.name}) hold {n} samples, index.json lists "
            f"{index['num_samples']} in its shards: rebuild the shard set"
        )
    return table


def shard_samples(
    directory: str | os.PathLike[str], index: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every shard entry of index.json with its sample dicts, in order (for checks and tools that
    read every sample anyway; the trainer works on the columns)."""
    index = read_index(directory) if index is None else index
    table = read_table(directory, index)
    for shard_id, shard in enumerate(index["shards"]):
        yield shard, table.shard_entries(shard_id)


def upgrade_index(directory: str | os.PathLike[str]) -> bool:
    """Rewrite a version-1 `index.json` (per-sample JSON lists) as this version, in place and
    atomically (columns first, then index.json replaced in one rename). Returns False when the set
    is already current. The tars are not touched."""
    directory = Path(directory)
    old = _load_json(directory)
    if old.get("format") != INDEX_FORMAT or old.get("version") not in (1, INDEX_VERSION):
        raise BuildError(
            f"{directory / INDEX_NAME}: format {old.get('format')!r} v{old.get('version')!r} is not a "
            "shard-set index this version can upgrade; rebuild the shard set"
        )
    if old["version"] == INDEX_VERSION:
        return False
    # Keys the v1 index carried besides the samples and their totals (rejects, synth, ...) stay.
    derived = {"format", "version", "tokenizer", "build", "shards", "num_samples", "num_tokens", "num_images"}
    kept = {k: v for k, v in old.items() if k not in derived}
    index, table = make_index(old["shards"], old["tokenizer"], old["build"], kept)
    for total in ("num_samples", "num_tokens", "num_images"):
        if index[total] != old.get(total):
            raise BuildError(
                f"{directory / INDEX_NAME}: its {total} ({old.get(total)}) disagrees with its own shard "
                f"lists ({index[total]}); the index is damaged: rebuild the shard set"
            )
    write_index(directory, index, table)
    return True
