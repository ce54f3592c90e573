"""`--dataset_args DATASET[train:N,test:M]`: shards built once into the cache, then reused."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from data_tools import shards
from data_tools.index import read_index, read_table
from trainer.config import ConfigError, load_config
from trainer.data import dataset_cache


def _config(tmp_path: Path, model: Path, spec: str) -> object:
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "run"), "--dataset_args", spec]
    return load_config(None, argv)


def _source_ids(directory: str) -> list[str]:
    index = read_index(directory)
    table = read_table(directory, index)
    out = []
    for shard_id, shard in enumerate(index["shards"]):
        for e in table.shard_entries(shard_id):
            out.append(
                shards.read_sample(Path(directory) / shard["name"], e["offset"], e["num_bytes"])["json"][
                    "source_id"
                ]
            )
    return out


def test_rank_zero_builds_once_and_a_second_run_reuses(
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_text_rows: Callable[..., None],
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    write_text_rows(tmp_path / "data.jsonl", 40, "r")
    config = _config(tmp_path, tiny_model_dir, f"{tmp_path / 'data.jsonl'}[train:24,test:8]")
    assert config.data.source and not config.data.train
    dataset_cache.ensure_source_shards(config)
    folder = Path(config.data.train[0]).parent
    assert folder.parent == tmp_path / "shard-cache" and (folder / dataset_cache.READY).is_file()
    # The first 24 rows train; with no held-out split in the source, the 8 rows after them test.
    assert _source_ids(config.data.train[0]) == [f"r{i}" for i in range(24)]
    assert _source_ids(config.data.test) == [f"r{i}" for i in range(24, 32)]
    index_time = (Path(config.data.train[0]) / "index.json").stat().st_mtime_ns
    again = _config(tmp_path, tiny_model_dir, f"{tmp_path / 'data.jsonl'}[train:24,test:8]")
    dataset_cache.ensure_source_shards(again)
    assert again.data.train == config.data.train
    assert (Path(again.data.train[0]) / "index.json").stat().st_mtime_ns == index_time  # reused
    # A saved run config names both the source and its cache (generate --checkpoint reloads it) ...
    dataset_cache.ensure_source_shards(again)
    assert again.data.train == config.data.train
    # ... but data.train pointing elsewhere is a clash.
    again.data.train = [str(tmp_path / "other")]
    with pytest.raises(ConfigError, match=r"data\.source builds the train and test shard sets itself"):
        dataset_cache.ensure_source_shards(again)
    # Another slice, or a changed source file, is another cache entry.
    other = _config(tmp_path, tiny_model_dir, f"{tmp_path / 'data.jsonl'}[train:16]")
    dataset_cache.ensure_source_shards(other)
    assert Path(other.data.train[0]).parent != folder and other.data.test == ""
    assert len(_source_ids(other.data.train[0])) == 16
    before = dataset_cache.cache_folder(config, "fp")
    write_text_rows(tmp_path / "data.jsonl", 41, "r")
    assert dataset_cache.cache_folder(config, "fp") != before


def test_held_out_split_and_other_ranks_wait(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        split: [
            {
                "id": f"{split}{i}",
                "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a"}],
            }
            for i in range(n)
        ]
        for split, n in (("train", 12), ("test", 6))
    }
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
    dataset.save_to_disk(str(tmp_path / "ds"))
    spec = f"{tmp_path / 'ds'}[train:10,test:4]"
    # Rank 1 waits for rank 0's READY marker, then reads the same folders.
    monkeypatch.setenv("RANK", "1")
    waiting = _config(tmp_path, tiny_model_dir, spec)
    waiter = threading.Thread(target=dataset_cache.ensure_source_shards, args=(waiting,))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not waiting.data.train
    monkeypatch.setenv("RANK", "0")
    config = _config(tmp_path, tiny_model_dir, spec)
    dataset_cache.ensure_source_shards(config)
    waiter.join(timeout=10)
    assert not waiter.is_alive() and waiting.data.train == config.data.train
    assert _source_ids(config.data.test) == [f"test{i}" for i in range(4)]  # the source's own test split
    assert _source_ids(config.data.train[0]) == [f"train{i}" for i in range(10)]
