"""The settings that define a trained model's input and decoding, carried with its weights.

Every committed checkpoint and every export (adapter and merged) holds ``mdlm_generation.json``
(not ``generation_config.json``, which transformers reads itself)::

    {"shift": bool,                   # diffusion.shift: position i-1 predicts token i
     "answer_padding": {...},         # build keys pad_answer_to, answer_padding, pad_tokens
     "min_pixels": int | null, "max_pixels": int | null,   # the training shards' image size
     "max_new_tokens": int,           # suggested canvas: p99 of the training answers, in whole blocks
     "block_size": int,
     "notes": [str]}                  # e.g. training sets that disagree (the first one's values are kept)

``generate`` and ``evaluate`` take these values for every flag the user left unset
(:func:`resolve_flags`), so a model is decoded the way it was trained.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.fileio import atomic_write_text
from trainer.config import TrainConfig

SETTINGS_FILE = "mdlm_generation.json"
BLOCK_SIZE = 32
"""The semi-autoregressive block the suggested canvas is counted in (GenerationConfig's default)."""
ANSWER_PADDING_KEYS = ("pad_answer_to", "answer_padding", "pad_tokens")
"""The build keys that describe how training answers were padded."""
FLAGS = ("shift", "max_new_tokens", "block_size", "min_pixels", "max_pixels")
"""The command-line flags a run's settings fill (argparse dest names)."""


def suggested_canvas(answer_lengths: Sequence[int] | np.ndarray, block_size: int = BLOCK_SIZE) -> int:
    """The 99th percentile (nearest rank) of the answer lengths, rounded up to whole blocks, at
    least one block: long enough for nearly every answer the model was trained on."""
    lengths = np.asarray(answer_lengths)
    if not len(lengths):
        return block_size
    rank = max(0, math.ceil(0.99 * len(lengths)) - 1)
    p99 = int(np.partition(lengths, rank)[rank])  # the rank-th smallest, without a full sort
    return max(block_size, -(-p99 // block_size) * block_size)


def generation_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of a run, from its config and the ``index.json`` of its training shard sets."""
    from data_tools.index import read_index, read_table
    from trainer.data import parse_shard_specs

    dirs, _ = parse_shard_specs(config.data.train, "data.train")
    indexes = [read_index(directory) for directory in dirs]
    builds = [index.get("build", {}) for index in indexes]
    first = builds[0]
    notes = []
    for key in ("min_pixels", "max_pixels", *ANSWER_PADDING_KEYS):
        values = [build.get(key) for build in builds]
        if any(value != values[0] for value in values):
            notes.append(
                f"the training shard sets disagree on {key} ({', '.join(map(str, values))}); "
                f"the first set's {values[0]} ({dirs[0]}) is recorded"
            )
    answer_lengths = np.concatenate(
        [read_table(d, index).num_answer_tokens for d, index in zip(dirs, indexes, strict=True)]
    )
    return {
        "shift": bool(config.diffusion.shift),
        "answer_padding": {key: first[key] for key in ANSWER_PADDING_KEYS if key in first},
        "min_pixels": first.get("min_pixels"),
        "max_pixels": first.get("max_pixels"),
        "max_new_tokens": suggested_canvas(answer_lengths),
        "block_size": BLOCK_SIZE,
        "notes": notes,
    }


def write_settings(folder: str | Path, settings: dict[str, Any]) -> Path:
    """Write ``folder/mdlm_generation.json`` atomically; returns its path."""
    path = Path(folder) / SETTINGS_FILE
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def read_settings(folder: str | Path) -> dict[str, Any] | None:
    """The settings stored in ``folder`` (a checkpoint, an adapter or a merged model), or None."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}): restore it or delete it") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{str(path)!r} holds no settings object: restore it or delete it")
    return settings


def resolve_flags(
    args: argparse.Namespace, settings: dict[str, Any] | None, source: str | None, defaults: dict[str, Any]
) -> str:
    """Fill every flag of :data:`FLAGS` the user left unset (None): the run's value, else ``defaults``.

    Returns the one line that says which values came from the run (``source`` names the file).
    """
    from_run = []
    for name in FLAGS:
        if getattr(args, name) is not None:
            continue
        value = (settings or {}).get(name)
        if value is not None:
            from_run.append(f"{name}={value}")
        setattr(args, name, defaults[name] if value is None else value)
    if settings is None:
        return "run settings: none found (no mdlm_generation.json); built-in defaults for unset flags"
    notes = "".join(f"; note: {note}" for note in settings.get("notes", []))
    taken = ", ".join(from_run) if from_run else "nothing (every flag given)"
    return f"run settings from {source}: {taken}{notes}"


def set_image_size(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize images to between ``min_pixels`` and ``max_pixels`` (None keeps the processor's bound)."""
    size = processor.image_processor.size
    processor.image_processor.size = {
        "shortest_edge": int(size["shortest_edge"] if min_pixels is None else min_pixels),
        "longest_edge": int(size["longest_edge"] if max_pixels is None else max_pixels),
    }
