"""Real shard sets with controlled lengths for the loader tests, written with data_tools' own writer.

Samples are tokenised with the real Qwen tokenizer and chat template (`data_tools.samples`), images
are PNGs (or JPEGs) already on the Qwen grid, and shards/index go through `data_tools.shards`, so the loader
reads exactly what a real build writes.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools import shards
from data_tools.index import make_index, write_index
from data_tools.samples import tokenize_conversation, tokenizer_info

SampleSpec = tuple[int, Sequence[tuple[int, int]]]
"""(words in the question, [(grid h, grid w), ...] of its images in 16-px patches, even sides)."""

_WORDS = ("invoice", "total", "amount", "date", "table", "row", "column", "value", "page", "sum")


def make_sample(
    tokenizer: Any, key: str, num_words: int, grids: Sequence[tuple[int, int]], image_format: str = "png"
) -> shards.EncodedSample:
    """One question/answer sample with `num_words` question words and images of the given grids
    (`image_format` "png" or "jpg")."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    question = " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), num_words))
    answer = f"{int(rng.integers(0, 1000))} won"
    content: list[dict[str, Any]] = [{"type": "image"} for _ in grids] + [{"type": "text", "text": question}]
    messages = [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    tokens = tokenize_conversation(tokenizer, messages, [h * w // 4 for h, w in grids])
    images = []
    for h, w in grids:
        pixels = rng.integers(0, 256, (16 * h, 16 * w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format={"png": "PNG", "jpg": "JPEG"}[image_format])
        images.append((image_format, buf.getvalue()))
    sample_json = {
        "key": key,
        "source_id": key,
        "messages": messages,
        "input_ids": tokens.input_ids,
        "answer_mask": tokens.answer_mask,
        "image_grid_thw": [[1, h, w] for h, w in grids],
        "num_tokens": len(tokens.input_ids),
        "images": [f"{i}.{image_format}" for i in range(len(grids))],
    }
    return shards.EncodedSample(json=sample_json, images=images)


def write_shard_set(
    directory: Path,
    tokenizer: Any,
    layout: Sequence[Sequence[SampleSpec]],
    prefix: str = "s",
    image_format: str = "png",
) -> list[str]:
    """Write one shard per entry of `layout` (its samples' specs) plus index.json; returns the keys."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    keys = []
    for shard_id, specs in enumerate(layout):
        samples = []
        for j, (num_words, grids) in enumerate(specs):
            key = f"{prefix}{shard_id:02d}_{j:03d}"
            samples.append(make_sample(tokenizer, key, num_words, grids, image_format))
            keys.append(key)
        entries.append(shards.write_shard(directory / shards.SHARD_PATTERN.format(shard_id), samples))
    write_index(
        directory,
        *make_index(entries, tokenizer_info(tokenizer, "tiny"), {"source": "tests/loader_shards.py"}),
    )
    return keys
