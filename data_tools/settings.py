"""`BuildSettings`: everything that decides the bytes of a shard set, and its command-line options.

Build from Python with the constructor (`BuildSettings(image_format="png")`); the `build` and
`synth` parsers take their option defaults from a `BuildSettings` value, so every default is
written once, in the dataclass (synth passes its own value, `synth.synth_build_settings()`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_tools import images as images_mod
from data_tools.errors import BuildError
from data_tools.samples import PAD_TOKENS, PADDING_MODES, TRAIN_ON, AnswerPadding
from data_tools.sources import Source

METRIC_NAMES = ("exact_match", "anls", "relaxed_accuracy")
"""The answer scorers of `trainer.inference.scoring` (named here: data_tools never imports trainer)."""


@dataclass
class BuildSettings:
    """Everything that decides the bytes of a shard set (recorded in `index.json` "build")."""

    min_pixels: int = images_mod.DEFAULT_MIN_PIXELS
    """Fewest pixels of a resized image (Qwen3-VL: 65,536 = 64 tokens)."""
    max_pixels: int = images_mod.DEFAULT_MAX_PIXELS
    """Most pixels of a resized image (Qwen3-VL: 16,777,216 = 16,384 tokens)."""
    max_image_pixels: int = images_mod.DEFAULT_MAX_IMAGE_PIXELS
    """Source images above this many pixels (read from the header) are rejected, never decoded."""
    max_image_bytes: int = 64 * 1024 * 1024
    """Image files larger than this are rejected (`image_file_too_large`) before any byte is read."""
    first_frame: bool = False
    """Keep the first frame of an animated or multi-page image instead of rejecting it (`multi_frame`)."""
    allow_outside_root: bool = False
    """Accept image paths that resolve outside the image root (rejected as `outside_image_root` by default)."""
    max_tokens: int | None = 8192
    """Samples longer than this are rejected (`too_many_tokens`); None = no limit."""
    samples_per_shard: int = 1000
    """A shard is closed when it holds this many samples."""
    max_shard_bytes: int = 512 * 1024 * 1024
    """... or when the next sample would take it over this many bytes."""
    image_format: str = "jpeg"
    """Stored image format: jpeg | png | webp."""
    image_quality: int = 95
    """JPEG / WebP quality."""
    train_on: str = "last"
    """Answer mask on the `last` assistant turn or on `all` assistant turns."""
    answer_padding: str = "random"
    """Pad targets after the last answer: `random` (to a length drawn per sample up to
    `pad_answer_to`, extra pads log-uniform), `uniform` (extra pads uniform), `fixed` (to exactly
    `pad_answer_to`) or `none` (samples.AnswerPadding)."""
    pad_answer_to: int = 64
    """The padded answer length (`fixed`) or the largest one drawn (`random`); 0 = no padding.
    Generation canvases up to this length are the ones training covers."""
    pad_tokens: str = "eos"
    """Pad tokens: `eos` (`<|endoftext|>` repeated) or `rainbow` (`<|endoftext|>`, then a cycle of
    distinct unused special tokens); eos learned better on the demo task (docs/DESIGN.md §10)."""
    seed: int = 0
    """Seeds the held-out split (`test_fraction`)."""
    limit: int | None = None
    """Read at most this many rows of each input split."""
    test_fraction: float = 0.0
    """Hold out this fraction of a single input split as `test` (by a seeded hash of the row position)."""
    max_reject_fraction: float = 0.5
    """The build fails when more than this fraction of rows is rejected."""
    metric: str = ""
    """How answers of this set are scored (`exact_match`, `anls`, `relaxed_accuracy`), recorded for
    `evaluate --metric auto`; "" = not said (exact match)."""

    def padding_for(self, key: str) -> AnswerPadding:
        """The answer padding of the sample `key` (its random draw is a hash of the seed and the key,
        so any `--workers` gives the same shards)."""
        mode = "none" if self.pad_answer_to == 0 else self.answer_padding
        digest = hashlib.sha256(f"pad:{self.seed}:{key}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        return AnswerPadding(mode=mode, length=self.pad_answer_to, tokens=self.pad_tokens, draw=draw)

    def validate(self) -> None:
        """Raise `BuildError` with a one-line message on impossible values."""
        if self.image_format not in images_mod.IMAGE_FORMATS:
            raise BuildError(f"--image-format {self.image_format}: use one of jpeg, png, webp")
        if self.train_on not in TRAIN_ON:
            raise BuildError(f"--train-on {self.train_on}: use last or all")
        if self.pad_answer_to < 0:
            raise BuildError(f"--pad-answer-to {self.pad_answer_to}: must be >= 0 (0 = no padding)")
        if self.answer_padding not in PADDING_MODES:
            raise BuildError(f"--answer-padding {self.answer_padding}: use one of {', '.join(PADDING_MODES)}")
        if self.pad_tokens not in PAD_TOKENS:
            raise BuildError(f"--pad-tokens {self.pad_tokens}: use one of {', '.join(PAD_TOKENS)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise BuildError(
                f"--min-pixels {self.min_pixels} / --max-pixels {self.max_pixels}: need 0 < min <= max"
            )
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            raise BuildError("--max-image-pixels and --max-image-bytes must be >= 1")
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1024:
            raise BuildError("--samples-per-shard must be >= 1 and --max-shard-bytes >= 1024")
        if not 0.0 <= self.test_fraction < 1.0:
            raise BuildError(f"--test-fraction {self.test_fraction}: must be in [0, 1)")
        if self.metric not in ("", *METRIC_NAMES):
            raise BuildError(f"--metric {self.metric}: use one of {', '.join(METRIC_NAMES)}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise BuildError(f"--max-reject-fraction {self.max_reject_fraction}: must be in [0, 1]")


SOURCE_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")


def source_files(spec: str) -> list[list[Any]]:
    """Name (relative to the source's folder), size and modification time of each data file of a
    local source; none for a hub name."""
    path = Path(spec)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()), path
    else:
        return []
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def source_identity(source: Source, input_split: str) -> dict[str, Any]:
    """What a build read: the source's data files (`source_files`) and its row count, or the
    dataset's own fingerprint for a hub dataset. A resumed build must find them unchanged."""
    rows = source.splits[input_split]
    identity: dict[str, Any] = {"rows": len(rows)}
    files = source_files(source.spec)
    if files:
        identity["files"] = files
    elif not Path(source.spec).exists() and getattr(rows, "_fingerprint", None):
        identity["fingerprint"] = rows._fingerprint
    return identity


def build_info_for(source: Source, settings: BuildSettings, input_split: str, name: str) -> dict[str, Any]:
    """The `index.json` "build" block: settings plus where the rows came from."""
    info = asdict(settings)
    # Not a property of the output: a re-run with another threshold may resume or reuse the set.
    info.pop("max_reject_fraction")
    info.update(
        source=source.spec,
        container=source.container,
        row_format=source.row_format,
        input_split=input_split,
        split=name,
        source_identity=source_identity(source, input_split),
    )
    return info


def with_model_pixels(settings: BuildSettings, model: str) -> BuildSettings:
    """`settings` with min/max pixels from the model folder's preprocessor_config.json, if it has one."""
    path = Path(model) / "preprocessor_config.json"
    if not path.is_file():
        return settings
    cfg = json.loads(path.read_text(encoding="utf-8"))
    size = cfg.get("size") or {}
    return dataclasses.replace(
        settings,
        min_pixels=int(size.get("shortest_edge", cfg.get("min_pixels", settings.min_pixels))),
        max_pixels=int(size.get("longest_edge", cfg.get("max_pixels", settings.max_pixels))),
    )


def add_build_options(
    parser: argparse.ArgumentParser, defaults: BuildSettings, pixels_from_model: bool
) -> None:
    """Options shared by `build` and `synth`; settings options default to the fields of `defaults`.

    `--min-pixels` / `--max-pixels` default to None (= take `defaults`' value, which `build` first
    replaces by the model's preprocessor values when `pixels_from_model`; see `settings_from_args`).
    """
    parser.add_argument(
        "--output", required=True, help="output directory (DIR/<split>/ when there are several)"
    )
    parser.add_argument(
        "--model", required=True, help="model folder (or hub id) whose tokenizer and template to use"
    )
    _add_image_options(parser, defaults, pixels_from_model)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=defaults.max_tokens or 0,
        help="reject longer samples (0 = no limit; default: %(default)s)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=defaults.samples_per_shard,
        help="close a shard at this many samples (default: %(default)s)",
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=defaults.max_shard_bytes,
        help="... or before it passes this many bytes (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default=defaults.train_on,
        help="answer mask on the last assistant turn or all of them (default: %(default)s)",
    )
    parser.add_argument(
        "--answer-padding",
        choices=PADDING_MODES,
        default=defaults.answer_padding,
        help="pad targets after the last answer: random (a length drawn per sample up to --pad-answer-to, "
        "log-uniform), uniform (the same, uniform), fixed (exactly --pad-answer-to) or none "
        "(default: %(default)s; docs/DESIGN.md §10)",
    )
    parser.add_argument(
        "--pad-answer-to",
        type=int,
        default=defaults.pad_answer_to,
        help="padded answer length (fixed) or the largest drawn (random); the longest generation canvas "
        "training covers; 0 = no padding (default: %(default)s)",
    )
    parser.add_argument(
        "--pad-tokens",
        choices=PAD_TOKENS,
        default=defaults.pad_tokens,
        help="eos: <|endoftext|> repeated; rainbow: <|endoftext|> then a cycle of distinct unused special "
        "tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seeds the --test-fraction hold-out (and synth)"
    )
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        default=defaults.max_reject_fraction,
        help="fail when more of the rows than this are rejected (default: %(default)s)",
    )
    parser.add_argument(
        "--metric",
        choices=METRIC_NAMES,
        default=defaults.metric or None,
        help="how answers of this set are scored, recorded for `evaluate --metric auto` "
        "(anls for document QA, relaxed_accuracy for charts; default: exact_match)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_image_options(
    parser: argparse.ArgumentParser, defaults: BuildSettings, pixels_from_model: bool
) -> None:
    """The options of `add_build_options` about images: grid size, caps, formats, the image root."""
    source = "the model's preprocessor, else " if pixels_from_model else ""
    parser.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help=f"fewest pixels of a resized image (default: {source}{defaults.min_pixels})",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help=f"most pixels of a resized image (default: {source}{defaults.max_pixels})",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="reject source images above this many pixels (checked before decoding; default: %(default)s)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=defaults.max_image_bytes,
        help="reject image files larger than this (checked before reading; default: %(default)s = 64 MiB)",
    )
    parser.add_argument(
        "--first-frame",
        action="store_true",
        help="keep the first frame of animated or multi-page images (default: reject them as multi_frame)",
    )
    parser.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept image paths outside the image root (default: reject them as outside_image_root)",
    )
    parser.add_argument(
        "--image-format",
        choices=sorted(images_mod.IMAGE_FORMATS),
        default=defaults.image_format,
        help="stored image format (default: %(default)s)",
    )
    parser.add_argument(
        "--image-quality",
        type=int,
        default=defaults.image_quality,
        help="JPEG/WebP quality (default: %(default)s)",
    )


def settings_from_args(args: argparse.Namespace, defaults: BuildSettings) -> BuildSettings:
    """`defaults` with every `BuildSettings` field that the parsed options set (None = not set)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(BuildSettings)
        if getattr(args, f.name, None) is not None
    }
    if "max_tokens" in values:
        values["max_tokens"] = values["max_tokens"] or None  # the command line writes "no limit" as 0
    return dataclasses.replace(defaults, **values)
