"""``data.source``: a raw dataset built into shards once, in a cache every rank reads.

``--dataset_args jp1924/KoDocumentTableVisualSFT[train:1000,test:100]`` (the seed script's flag) names a
dataset, not shards. Before any process group starts, global rank 0 builds its first N training rows
and M held-out rows with ``data_tools`` (the model's tokenizer and chat template, the model's image
pixels, ``data.max_tokens``) into ``data.cache_dir/NAME-KEY/{train,test}``, while every other rank
(and node, on a shared filesystem) waits for the folder's ``READY`` marker. The key covers the source
(its path and the size and modification time of its data files, or the hub name), the slice, the
tokenizer fingerprint and the build settings, so a second run reuses the shards and any change builds
new ones. An interrupted build resumes (``data_tools`` keeps finished shards); a lock file keeps two
jobs from building the same folder at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_tools.errors import BuildError
from data_tools.fileio import atomic_write_text
from data_tools.index import INDEX_VERSION
from data_tools.settings import BuildSettings, source_files, with_model_pixels
from trainer.config import ConfigError, TrainConfig
from trainer.config.launch_env import env_rank

READY = "READY"
HELD_OUT_SPLITS = ("test", "validation")
WAIT_LOG_EVERY_S = 60.0


class RowSlice(Sequence[Any]):
    """Rows ``[start, stop)`` of a split, keeping the split's ``where`` for rejects.jsonl."""

    def __init__(self, rows: Sequence[Any], start: int, stop: int) -> None:
        self.rows, self.start, self.stop = rows, start, max(start, min(stop, len(rows)))
        where = getattr(rows, "where", None)
        if where is not None:
            self.where = lambda i: where(self.start + i)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: Any) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.rows[self.start + i]

    def __iter__(self) -> Iterator[Any]:
        return (self.rows[i] for i in range(self.start, self.stop))


def build_settings(config: TrainConfig) -> BuildSettings:
    """The shards' settings: data_tools defaults, the model's image pixels, the run's length cap and seed."""
    defaults = BuildSettings(max_tokens=config.data.max_tokens, seed=config.seed)
    return with_model_pixels(defaults, config.model.name_or_path)


def cache_folder(config: TrainConfig, tokenizer_fingerprint: str) -> Path:
    """``cache_dir/NAME-KEY``: NAME from the source, KEY a hash of everything the shards depend on."""
    data = config.data
    spec = data.source
    identity = {
        "source": str(Path(spec).resolve()) if Path(spec).exists() else spec,
        "files": source_files(spec),
        "format": data.source_format,
        "slice": [data.limit_train, data.limit_test],
        "tokenizer": tokenizer_fingerprint,
        "build": dataclasses.asdict(build_settings(config)),
        "index_version": INDEX_VERSION,  # a cache of an older index format is built anew, not misread
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.rstrip("/")).name or "dataset")[:60]
    root = (
        Path(data.cache_dir) if data.cache_dir else Path(config.output_dir).resolve().parent / "shard-cache"
    )
    return root / f"{name}-{key}"


def ensure_source_shards(config: TrainConfig) -> None:
    """Point ``data.train`` / ``data.test`` at the shards of ``data.source``, building them first on
    global rank 0 (the other ranks wait). No-op without ``data.source``."""
    if not config.data.source:
        return
    from data_tools.samples import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(config.model.name_or_path)
    folder = cache_folder(config, tokenizer_fingerprint(tokenizer))
    # A saved run config holds both (data.train then names this cache); anything else is a clash.
    if config.data.train not in ([], [str(folder / "train")]):
        raise ConfigError(
            f"data.source builds the train and test shard sets itself (into {folder}); "
            f"leave data.train unset (it is {config.data.train})"
        )
    if env_rank() == 0:
        source = _open(config)  # a source that cannot be read fails here, before any folder is made
        _build_once(config, folder, source)
    else:
        _wait_for(folder)
    config.data.train = [str(folder / "train")]
    config.data.test = str(folder / "test") if (folder / "test" / "index.json").is_file() else ""


def _wait_for(folder: Path) -> None:
    """Wait for rank 0's build (if rank 0 fails, the launcher ends this rank)."""
    started = last_note = time.monotonic()
    while not (folder / READY).is_file():
        if time.monotonic() - last_note >= WAIT_LOG_EVERY_S:
            print(f"train: waiting for rank 0 to build shards into {folder} "
                  f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            last_note = time.monotonic()
        time.sleep(1.0)


def _open(config: TrainConfig) -> Any:
    from data_tools.sources import open_source

    try:
        return open_source(config.data.source, config.data.source_format or None)
    except BuildError as err:
        raise ConfigError(f"data.source: {err}") from err


def _build_once(config: TrainConfig, folder: Path, source: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another job building the same shards: wait, then reuse them
        if (folder / READY).is_file():
            print(
                f"train: shards of {config.data.source} from the cache: {folder}", file=sys.stderr, flush=True
            )
            return
        print(
            f"train: building shards of {config.data.source} into {folder} (once)",
            file=sys.stderr,
            flush=True,
        )
        try:
            _build(config, folder, source)
        except BuildError as err:
            raise ConfigError(f"data.source {config.data.source}: {err}") from err
        atomic_write_text(folder / READY, json.dumps({"source": config.data.source}) + "\n")


def _build(config: TrainConfig, folder: Path, source: Any) -> None:
    from data_tools.build import run_build
    from data_tools.sources import Source

    data = config.data
    names = list(source.splits)
    train_split = "train" if "train" in names else names[0]
    train_rows = source.splits[train_split]
    n_train = data.limit_train or len(train_rows)
    splits: dict[str, Sequence[Any]] = {"train": RowSlice(train_rows, 0, n_train)}
    held_out = next((name for name in HELD_OUT_SPLITS if name in names), None)
    if held_out is not None:
        rows = source.splits[held_out]
        splits["test"] = RowSlice(rows, 0, data.limit_test or len(rows))
    elif data.limit_test:  # no held-out split: the rows right after the training rows
        splits["test"] = RowSlice(train_rows, n_train, n_train + data.limit_test)
    sliced = Source(data.source, source.container, source.row_format, splits, source.base_dir)
    from trainer.data.loader import usable_cpu_count

    workers = min(16, usable_cpu_count())  # the other ranks only wait: rank 0 may use every core
    run_build(
        sliced, folder, config.model.name_or_path, build_settings(config), workers, force_split_dirs=True
    )
