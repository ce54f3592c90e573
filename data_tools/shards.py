"""Atomic WebDataset shard writer, reader by byte offset, and `verify` (the index: `data_tools.index`).

Format (docs/CONTRACTS.md, "Shard set"): each sample is a contiguous group of tar members
`KEY.json`, `KEY.0.jpg`, `KEY.1.jpg`, ... with fixed metadata (mtime 0, uid/gid 0, empty names),
so building twice gives byte-identical tars. Every shard is written under a temporary name,
fsynced and renamed; `index.json` is written last, so a directory without it is an incomplete build.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools.fileio import file_sha256, fsync_dir, temporary_path
from data_tools.images import decode_stored_image
from data_tools.index import COLUMNS_PREFIX, read_index, read_table

REJECTS_NAME = "rejects.jsonl"
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# USTAR names hold 100 bytes; "KEY.NN.webp" must fit without a PAX header (keeps tars plain).
MAX_KEY_LENGTH = 80
TAR_BLOCK = 512


def validate_key(key: str) -> str:
    """Return `key` if it is a valid sample key (`[A-Za-z0-9_-]+`, no dots, <= 80 chars), else raise."""
    if not isinstance(key, str) or not KEY_RE.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"invalid sample key {key!r}: use 1-{MAX_KEY_LENGTH} characters from [A-Za-z0-9_-] (no dots)"
        )
    return key


@dataclass
class EncodedSample:
    """One sample ready to be written: its JSON (see CONTRACTS.md) and its encoded images.

    `images` holds `(extension, bytes)` pairs in order of appearance; the extensions must match
    `json["images"]` (`"0.jpg"`, `"1.jpg"`, ...).
    """

    json: dict[str, Any]
    images: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The sample key (`json["key"]`)."""
        return str(self.json["key"])

    def members(self) -> list[tuple[str, bytes]]:
        """Tar members `(name, data)` in write order: `KEY.json` first, then the images."""
        key = validate_key(self.key)
        names = [f"{i}.{ext}" for i, (ext, _) in enumerate(self.images)]
        if names != list(self.json.get("images", [])):
            raise ValueError(f"sample {key}: json images {self.json.get('images')} != members {names}")
        data = json.dumps(self.json, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        out = [(f"{key}.json", data)]
        out += [(f"{key}.{name}", raw) for name, (_, raw) in zip(names, self.images, strict=True)]
        return out

    def tar_bytes(self) -> int:
        """Bytes this sample takes in a tar (headers + data padded to 512-byte blocks)."""
        return sum(TAR_BLOCK + _padded(len(data)) for _, data in self.members())


def _padded(n: int) -> int:
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata makes the tar a pure function of the samples (reproducible builds).
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_shard(path: str | os.PathLike[str], samples: Sequence[EncodedSample]) -> dict[str, Any]:
    """Write `samples` to the tar `path` atomically and return its `index.json` shard entry.

    The entry is `{"name", "num_bytes", "sha256", "samples": [{"key", "offset", "num_bytes",
    "num_tokens", "num_answer_tokens", "num_images", "image_grid_thw"}]}`.
    """
    path = Path(path)
    # Streamed, not built in memory: the same temporary name, fsync and rename as fileio's writes.
    tmp = temporary_path(path)
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    with open(tmp, "wb") as f:
        # USTAR: no PAX headers for our short ASCII names, so every member is exactly one header.
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                if sample.key in seen:
                    raise ValueError(f"duplicate sample key {sample.key!r} in shard {path.name}")
                seen.add(sample.key)
                offset = f.tell()
                for name, data in sample.members():
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                j = sample.json
                entries.append(
                    {
                        "key": sample.key,
                        "offset": offset,
                        "num_bytes": f.tell() - offset,
                        "num_tokens": int(j["num_tokens"]),
                        "num_answer_tokens": int(sum(j["answer_mask"])),
                        "num_images": len(sample.images),
                        "image_grid_thw": [list(map(int, g)) for g in j["image_grid_thw"]],
                    }
                )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {
        "name": path.name,
        "num_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "samples": entries,
    }


def decode_sample_bytes(raw: bytes) -> dict[str, Any]:
    """Parse the tar bytes of one sample into `{"json": dict, "images": [PIL.Image]}`.

    An image in a format off `ALLOWED_FORMATS` raises `DisallowedImageFormat`.
    """
    members: dict[str, bytes] = {}
    key = None
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                raise ValueError(f"unexpected tar member {info.name!r} (not a regular file)")
            base, _, suffix = info.name.partition(".")
            if key is None:
                key = base
            elif base != key:
                raise ValueError(f"member {info.name!r} does not belong to sample {key!r}")
            f = tar.extractfile(info)
            assert f is not None
            members[suffix] = f.read()
    if "json" not in members:
        raise ValueError(f"sample {key!r} has no .json member")
    sample_json = json.loads(members["json"].decode("utf-8"))
    images = []
    for name in sample_json.get("images", []):
        if name not in members:
            raise ValueError(f"sample {key!r} lacks image member {name!r}")
        # Same format allowlist as the build: a shard edited by hand must not reach other decoders.
        images.append(decode_stored_image(members[name]))
    return {"json": sample_json, "images": images}


def read_sample(shard_path: str | os.PathLike[str], offset: int, num_bytes: int) -> dict[str, Any]:
    """Read one sample by its byte range (from `index.json`): `{"json": dict, "images": [PIL.Image]}`.

    Raises `ValueError` (or `OSError`) on a truncated or corrupt sample; callers skip and count it.
    """
    with open(shard_path, "rb") as f:
        f.seek(offset)
        raw = f.read(num_bytes)
    if len(raw) != num_bytes:
        raise ValueError(
            f"{shard_path}: sample at offset {offset} is truncated ({len(raw)}/{num_bytes} bytes)"
        )
    return decode_sample_bytes(raw)


def check_files(directory: str | os.PathLike[str], index: dict[str, Any] | None = None) -> list[str]:
    """A fast check that the shard files still match the index (what every rank runs at start): each
    listed shard exists with its recorded size and its first sample's tar header at the recorded
    offset names that sample. `verify` is the full check (every sample, hashes)."""
    directory = Path(directory)
    index = read_index(directory) if index is None else index
    try:
        table = read_table(directory, index)
    except ValueError as e:
        return [str(e)]
    problems = []
    for shard_id, shard in enumerate(index.get("shards", [])):
        path = directory / shard["name"]
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{shard['name']} is missing")
            continue
        if size != shard["num_bytes"]:
            problems.append(f"{shard['name']} has {size} bytes, index.json says {shard['num_bytes']}")
            continue
        if shard["num_samples"]:
            first = int(table.shard_start[shard_id])
            key, offset = table.key_of(first), int(table.offset[first])
            with open(path, "rb") as f:
                f.seek(offset)
                name = f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")
            if name.partition(".")[0] != key:
                problems.append(f"{shard['name']}: the tar at offset {offset} holds {name!r}, not {key}")
    return problems


def check_sample(sample: dict[str, Any], entry: dict[str, Any], where: str) -> list[str]:
    """Problems of one read-back sample against its index entry (empty = it is what the index says)."""
    problems = []
    j = sample["json"]
    ids, mask = j.get("input_ids", []), j.get("answer_mask", [])
    if j.get("key") != entry["key"]:
        problems.append(f"{where}: json key {j.get('key')!r} != index key {entry['key']!r}")
    if not (len(ids) == len(mask) == j.get("num_tokens") == entry["num_tokens"]):
        problems.append(
            f"{where}: token lengths disagree (input_ids {len(ids)}, answer_mask {len(mask)}, "
            f"json num_tokens {j.get('num_tokens')}, index {entry['num_tokens']})"
        )
    if sum(mask) != entry["num_answer_tokens"]:
        problems.append(f"{where}: {sum(mask)} answer tokens, index says {entry['num_answer_tokens']}")
    if sum(mask) == 0:
        problems.append(f"{where}: no answer tokens")
    grids = [list(g) for g in j.get("image_grid_thw", [])]
    if grids != entry["image_grid_thw"]:
        problems.append(f"{where}: image_grid_thw {grids} != index {entry['image_grid_thw']}")
    if len(sample["images"]) != entry["num_images"] or len(grids) != len(sample["images"]):
        problems.append(f"{where}: {len(sample['images'])} images, index says {entry['num_images']}")
    for i, (image, grid) in enumerate(zip(sample["images"], grids, strict=False)):
        if image.size != (16 * grid[2], 16 * grid[1]):
            problems.append(
                f"{where}: image {i} is {image.size[0]}x{image.size[1]}, grid {grid} wants "
                f"{16 * grid[2]}x{16 * grid[1]}"
            )
    return problems


def verify(
    directory: str | os.PathLike[str], expected_fingerprint: str | None = None, check_hashes: bool = True
) -> list[str]:
    """Check a shard set against its `index.json`; return a list of problems (empty = valid).

    Reads every sample by its offset and also walks each tar from the start, so offsets, sample
    counts, token lengths, image grids and sizes, shard sizes/hashes, totals and (when given) the
    tokenizer fingerprint are all checked. Shard files not listed in the index are problems too
    (leftovers of an interrupted build).
    """
    directory = Path(directory)
    try:
        index = read_index(directory)
    except ValueError as e:
        return [str(e)]
    problems: list[str] = []
    fingerprint = index.get("tokenizer", {}).get("fingerprint")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        problems.append(f"tokenizer fingerprint {fingerprint} != the model's {expected_fingerprint}")
    listed = {s["name"] for s in index["shards"]}
    for p in sorted(directory.iterdir()):
        if (SHARD_RE.match(p.name) and p.name not in listed) or ".tmp-" in p.name:
            problems.append(f"{p.name}: not listed in index.json (left over from an interrupted build)")
        elif p.name.startswith(COLUMNS_PREFIX) and p.name != index.get("columns"):
            problems.append(f"{p.name}: a sample-column folder index.json does not name (a leftover)")
    try:
        table = read_table(directory, index)
    except ValueError as e:
        return [*problems, str(e)]
    totals = {
        "num_samples": len(table),
        "num_tokens": int(table.num_tokens.sum(dtype=np.int64)),
        "num_images": len(table.image_grid_thw),
    }
    for k, v in totals.items():
        if index.get(k) != v:
            problems.append(f"index {k} = {index.get(k)} but the sample columns hold {v}")
    keys: set[str] = set()
    for shard_id, shard in enumerate(index["shards"]):
        path = directory / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["num_bytes"]:
            problems.append(f"{shard['name']}: {size} bytes, index says {shard['num_bytes']}")
            continue
        if check_hashes and file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from index")
        entries = table.shard_entries(shard_id)
        problems += _check_tar_layout(path, shard["name"], entries)
        for entry in entries:
            where = f"{shard['name']}:{entry['key']}"
            if entry["key"] in keys:
                problems.append(f"{where}: duplicate key")
            keys.add(entry["key"])
            try:
                sample = read_sample(path, entry["offset"], entry["num_bytes"])
            except (OSError, ValueError, tarfile.TarError, Image.UnidentifiedImageError) as e:
                problems.append(f"{where}: unreadable at offset {entry['offset']} ({e})")
                continue
            problems += check_sample(sample, entry, where)
    return problems


def _check_tar_layout(path: Path, name: str, entries: list[dict[str, Any]]) -> list[str]:
    """Walk the tar from the start: sample groups, in order, at the offsets the index gives."""
    groups: list[tuple[str, int]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                key = info.name.partition(".")[0]
                if not groups or groups[-1][0] != key:
                    groups.append((key, info.offset))
    except (OSError, tarfile.TarError) as e:
        return [f"{name}: not a readable tar ({e})"]
    want = [(s["key"], s["offset"]) for s in entries]
    if groups != want:
        return [f"{name}: tar holds samples {groups[:3]}... but index lists {want[:3]}..."]
    return []
