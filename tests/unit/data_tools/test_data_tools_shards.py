"""Shard writer, reader by offset and verify (no tokenizer needed: samples are built by hand)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools import shards
from data_tools.index import INDEX_FORMAT, make_index, read_index, read_table, write_index


def _sample(key: str, num_images: int = 1, size: tuple[int, int] = (64, 32)) -> shards.EncodedSample:
    images = []
    for i in range(num_images):
        buf = io.BytesIO()
        Image.new("RGB", size, (10 * i, 100, 200)).save(buf, format="PNG")
        images.append(("png", buf.getvalue()))
    grid = [[1, size[1] // 16, size[0] // 16]] * num_images
    ids = [1, 2, 3, 4, 5]
    return shards.EncodedSample(
        json={
            "key": key,
            "source_id": key,
            "messages": [],
            "input_ids": ids,
            "answer_mask": [0, 0, 0, 1, 1],
            "image_grid_thw": grid,
            "num_tokens": len(ids),
            "images": [f"{i}.png" for i in range(num_images)],
        },
        images=images,
    )


def _write_set(directory: Path, num_shards: int = 2) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(num_shards):
        samples = [_sample(f"s{s}_{i}", num_images=i % 3) for i in range(4)]
        entries.append(shards.write_shard(directory / shards.SHARD_PATTERN.format(s), samples))
    index, table = make_index(entries, {"fingerprint": "abc", "name_or_path": "x", "mask_token_id": None}, {})
    write_index(directory, index, table)
    return read_index(directory)


def test_offsets_read_sample_and_plain_tarfile(tmp_path: Path) -> None:
    index = _write_set(tmp_path)
    assert index["num_samples"] == 8 and index["num_images"] == 2 * (0 + 1 + 2 + 0)
    shard = index["shards"][1]
    path = tmp_path / shard["name"]
    assert shard["num_bytes"] == path.stat().st_size
    raw = path.read_bytes()
    for entry in read_table(tmp_path).shard_entries(1):
        # The contract: the byte range alone is a valid tar holding exactly this sample's members.
        chunk = raw[entry["offset"] : entry["offset"] + entry["num_bytes"]]
        with tarfile.open(fileobj=io.BytesIO(chunk)) as tar:
            names = tar.getnames()
        assert names == [f"{entry['key']}.json"] + [
            f"{entry['key']}.{i}.png" for i in range(entry["num_images"])
        ]
        sample = shards.read_sample(path, entry["offset"], entry["num_bytes"])
        assert sample["json"]["key"] == entry["key"]
        assert [im.size for im in sample["images"]] == [(64, 32)] * entry["num_images"]
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    assert shards.verify(tmp_path) == []


def _as_jpeg(sample: shards.EncodedSample) -> shards.EncodedSample:
    """The same sample with its images stored as JPEG."""
    images = []
    for _, data in sample.images:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, format="JPEG")
        images.append(("jpg", buf.getvalue()))
    return shards.EncodedSample(
        json={**sample.json, "images": [f"{i}.jpg" for i in range(len(images))]}, images=images
    )


def test_webdataset_reads_every_member_with_the_bytes_of_read_sample(tmp_path: Path) -> None:
    # The shards are plain WebDataset tars (webdataset is a test dependency: no code imports it).
    entries = []
    for s in range(2):
        samples = [_sample(f"s{s}_{i}", num_images=i % 3) for i in range(4)]
        samples += [_as_jpeg(_sample(f"j{s}_{i}", num_images=i + 1)) for i in range(2)]
        entries.append(shards.write_shard(tmp_path / shards.SHARD_PATTERN.format(s), samples))
    urls = [str(tmp_path / entry["name"]) for entry in entries]
    rows = list(wds.WebDataset(urls, shardshuffle=False))
    indexed = [(entry["name"], sample) for entry in entries for sample in entry["samples"]]
    assert [row["__key__"] for row in rows] == [sample["key"] for _, sample in indexed]
    for row, (name, sample) in zip(rows, indexed, strict=True):
        path = tmp_path / name
        with open(path, "rb") as f:
            f.seek(sample["offset"])
            raw = f.read(sample["num_bytes"])
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            members = {info.name.split(".", 1)[1]: tar.extractfile(info).read() for info in tar}  # type: ignore[union-attr]
        assert {k: v for k, v in row.items() if not k.startswith("__")} == members
        expected = shards.read_sample(path, sample["offset"], sample["num_bytes"])
        assert json.loads(row["json"]) == expected["json"]
        images = [Image.open(io.BytesIO(row[member])) for member in expected["json"]["images"]]
        assert len(images) == sample["num_images"]
        for image, read in zip(images, expected["images"], strict=True):
            assert image.convert(read.mode).tobytes() == read.tobytes()
    assert {m.rsplit(".", 1)[-1] for row in rows for m in row if m[0].isdigit()} == {"png", "jpg"}


def test_reproducible_bytes(tmp_path: Path) -> None:
    _write_set(tmp_path / "a")
    _write_set(tmp_path / "b")
    for name in ["shard-000000.tar", "shard-000001.tar", "index.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_verify_reports_problems(tmp_path: Path) -> None:
    index = _write_set(tmp_path)
    # Wrong fingerprint.
    assert any("fingerprint" in p for p in shards.verify(tmp_path, expected_fingerprint="zzz"))
    # A stray shard (interrupted build) and a temp file are reported.
    (tmp_path / "shard-000009.tar").write_bytes(b"")
    (tmp_path / ".shard-000002.tar.tmp-1").write_bytes(b"")
    problems = shards.verify(tmp_path)
    assert any("shard-000009.tar" in p for p in problems) and any(".tmp-" in p for p in problems)
    (tmp_path / "shard-000009.tar").unlink()
    (tmp_path / ".shard-000002.tar.tmp-1").unlink()
    # A wrong token length in the index.
    table = read_table(tmp_path, index)
    num_tokens = np.array(table.num_tokens)
    num_tokens[1] = 99
    write_index(tmp_path, index, dataclasses.replace(table, num_tokens=num_tokens))
    assert any("token lengths" in p for p in shards.verify(tmp_path))
    # A truncated shard.
    write_index(tmp_path, index, table)
    path = tmp_path / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:1000])
    assert any("shard-000001.tar" in p for p in shards.verify(tmp_path))
    # No index at all = an incomplete build.
    (tmp_path / "index.json").unlink()
    assert "not a complete shard set" in shards.verify(tmp_path)[0]


def test_bad_keys_rejected(tmp_path: Path) -> None:
    for key in ["a.b", "", "x/y", "k" * 81]:
        with pytest.raises(ValueError, match="invalid sample key"):
            shards.write_shard(tmp_path / "shard-000000.tar", [_sample(key)])


def test_read_sample_truncated(tmp_path: Path) -> None:
    index = _write_set(tmp_path, num_shards=1)
    entry = read_table(tmp_path, index).shard_entries(0)[-1]
    with pytest.raises(ValueError, match="truncated"):
        shards.read_sample(tmp_path / "shard-000000.tar", entry["offset"] + 10_000, entry["num_bytes"])
    assert json.loads((tmp_path / "index.json").read_text())["format"] == INDEX_FORMAT
