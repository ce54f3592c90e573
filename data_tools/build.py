"""`python -m data_tools build`: source rows -> samples (in a process pool) -> atomic shards + index.

Order and output are deterministic: rows are processed in input order (`imap` keeps it), shard
boundaries depend only on the samples, so any `--workers` gives byte-identical shards. Resume:
after each finished shard a small record (`DIR/.build/shard-NNNNNN.json`: its index entry, the
input position it ends at and its rejects) is written atomically; a re-run with the same settings
keeps those shards and continues after them. `index.json` is written last and `.build/` removed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_tools import images as images_mod
from data_tools import shards
from data_tools.samples import SampleError, load_tokenizer, tokenize_conversation, tokenizer_info
from data_tools.sources import Conversation, Source, load_image_bytes, normalise_row, open_source

STATE_DIR = ".build"
REJECT_CHECK_AFTER = 200  # rows seen before the reject fraction may abort a build early


@dataclass
class BuildSettings:
    """Everything that decides the bytes of a shard set (recorded in `index.json` "build")."""

    min_pixels: int = images_mod.DEFAULT_MIN_PIXELS
    """Fewest pixels of a resized image (Qwen3-VL: 65,536 = 64 tokens)."""
    max_pixels: int = images_mod.DEFAULT_MAX_PIXELS
    """Most pixels of a resized image (Qwen3-VL: 16,777,216 = 16,384 tokens)."""
    max_image_pixels: int = images_mod.DEFAULT_MAX_IMAGE_PIXELS
    """Source images above this many pixels (read from the header) are rejected, never decoded."""
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
    pad_answer_to: int = 0
    """Pad the last answer to this many target tokens with `<|endoftext|>` (0 = off; LLaDA's SFT
    recipe: the model learns to end a fixed-size generation canvas; see samples.tokenize_conversation)."""
    seed: int = 0
    """Seeds the held-out split (`test_fraction`)."""
    limit: int | None = None
    """Read at most this many rows of each input split."""
    test_fraction: float = 0.0
    """Hold out this fraction of a single input split as `test` (by a seeded hash of the row position)."""
    max_reject_fraction: float = 0.5
    """The build fails when more than this fraction of rows is rejected."""

    def validate(self) -> None:
        """Raise `SystemExit` with a one-line message on impossible values."""
        if self.image_format not in images_mod.IMAGE_FORMATS:
            raise SystemExit(f"--image-format {self.image_format}: use one of jpeg, png, webp")
        if self.train_on not in ("last", "all"):
            raise SystemExit(f"--train-on {self.train_on}: use last or all")
        if self.pad_answer_to < 0:
            raise SystemExit(f"--pad-answer-to {self.pad_answer_to}: must be >= 0 (0 = no padding)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise SystemExit(
                f"--min-pixels {self.min_pixels} / --max-pixels {self.max_pixels}: need 0 < min <= max"
            )
        if self.samples_per_shard < 1 or self.max_shard_bytes < 1024:
            raise SystemExit("--samples-per-shard must be >= 1 and --max-shard-bytes >= 1024")
        if not 0.0 <= self.test_fraction < 1.0:
            raise SystemExit(f"--test-fraction {self.test_fraction}: must be in [0, 1)")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise SystemExit(f"--max-reject-fraction {self.max_reject_fraction}: must be in [0, 1]")


@dataclass
class SplitResult:
    """What one split's build did (for the summary table)."""

    name: str
    directory: Path
    num_samples: int = 0
    num_images: int = 0
    token_lengths: list[int] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)
    num_shards: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    resumed_shards: int = 0
    skipped: bool = False


# ------------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(model: str, settings: BuildSettings, row_format: str, base_dir: str | None) -> None:
    # A forked worker inherits the tokenizer the parent loaded; spawned ones load their own.
    if "tokenizer" not in _WORKER or _WORKER.get("model") != model:
        _WORKER["tokenizer"] = load_tokenizer(model)
        _WORKER["model"] = model
    _WORKER.update(settings=settings, row_format=row_format, base_dir=base_dir)


def encode_conversation(
    conv: Conversation, key: str, tokenizer: Any, settings: BuildSettings
) -> shards.EncodedSample:
    """Images -> Qwen grid, conversation -> tokens; raises `SampleError`/`ImageError` to reject."""
    processed = []
    for ref in conv.images:
        data = load_image_bytes(ref)
        processed.append(
            images_mod.process_image(
                data,
                min_pixels=settings.min_pixels,
                max_pixels=settings.max_pixels,
                image_format=settings.image_format,
                quality=settings.image_quality,
                max_image_pixels=settings.max_image_pixels,
            )
        )
    tokens = tokenize_conversation(
        tokenizer,
        conv.messages,
        [p.num_tokens for p in processed],
        settings.train_on,
        pad_answer_to=settings.pad_answer_to,
    )
    if settings.max_tokens is not None and len(tokens.input_ids) > settings.max_tokens:
        raise SampleError(
            "too_many_tokens", f"{len(tokens.input_ids)} tokens > --max-tokens {settings.max_tokens}"
        )
    sample_json: dict[str, Any] = {
        "key": key,
        "source_id": conv.source_id,
        "messages": conv.messages,
        "input_ids": tokens.input_ids,
        "answer_mask": tokens.answer_mask,
        "image_grid_thw": [p.grid_thw for p in processed],
        "num_tokens": len(tokens.input_ids),
        "images": [f"{i}.{p.ext}" for i, p in enumerate(processed)],
    }
    if conv.meta is not None:
        sample_json["meta"] = conv.meta
    return shards.EncodedSample(json=sample_json, images=[(p.ext, p.data) for p in processed])


def _process(task: tuple[int, str, Any]) -> tuple[int, shards.EncodedSample | None, dict[str, Any] | None]:
    """Worker entry: `(position, key, row)` -> `(position, sample, None)` or `(position, None, reject)`."""
    position, key, row = task
    source_id = key
    try:
        conv = normalise_row(row, _WORKER["row_format"], _WORKER["base_dir"], fallback_id=key)
        source_id = conv.source_id
        sample = encode_conversation(conv, key, _WORKER["tokenizer"], _WORKER["settings"])
        return position, sample, None
    except (SampleError, images_mod.ImageError) as e:
        return position, None, {"key": key, "source_id": source_id, "reason": e.reason, "detail": str(e)}
    except Exception as e:  # never let one odd row kill a long build; it is counted and listed
        return position, None, {"key": key, "source_id": source_id, "reason": "error", "detail": repr(e)}


# ------------------------------------------------------------------------------- main side


def _in_test(seed: int, position: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{position}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def plan_splits(source: Source, settings: BuildSettings) -> dict[str, tuple[str, Sequence[Any], list[int]]]:
    """Output split -> (input split, its rows, the row positions it takes), in input order."""
    plans: dict[str, tuple[str, Sequence[Any], list[int]]] = {}
    for name, rows in source.splits.items():
        n = len(rows) if settings.limit is None else min(len(rows), settings.limit)
        positions = list(range(n))
        if settings.test_fraction > 0:
            if len(source.splits) != 1:
                raise SystemExit("--test-fraction holds out part of one split; give a single --split")
            test = [p for p in positions if _in_test(settings.seed, p, settings.test_fraction)]
            test_set = set(test)
            plans["train"] = (name, rows, [p for p in positions if p not in test_set])
            plans["test"] = (name, rows, test)
        else:
            plans[name] = (name, rows, positions)
    return plans


def _process_chunk(chunk: list[tuple[int, str, Any]]) -> list[Any]:
    return [_process(task) for task in chunk]


def _ordered_map(
    pool: ProcessPoolExecutor, tasks: Iterator[tuple[int, str, Any]], window: int, chunk_size: int = 4
) -> Iterator[Any]:
    """Results in input order with at most `window` chunks in flight (rows are read lazily).

    Unlike `multiprocessing.Pool.imap`, a worker that dies (a decoder crash, the OOM killer) ends
    the build with an error instead of a hang."""
    pending: deque[Future[list[Any]]] = deque()

    def submit() -> bool:
        chunk = list(itertools.islice(tasks, chunk_size))
        if chunk:
            pending.append(pool.submit(_process_chunk, chunk))
        return bool(chunk)

    while len(pending) < window and submit():
        pass
    while pending:
        try:
            done = pending.popleft().result()
        except BrokenProcessPool as e:
            raise SystemExit(
                f"a build worker died ({e}); re-run to resume, or use --workers 1 to find the row"
            ) from e
        submit()
        yield from done


def _state_path(directory: Path, shard_id: int) -> Path:
    return directory / STATE_DIR / f"shard-{shard_id:06d}.json"


def _load_finished(directory: Path) -> list[dict[str, Any]]:
    """Finished shard records of an interrupted build whose tar is intact, in order."""
    done: list[dict[str, Any]] = []
    while (p := _state_path(directory, len(done))).is_file():
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            break
        entry = record["entry"]
        tar = directory / entry["name"]
        if (
            not tar.is_file()
            or tar.stat().st_size != entry["num_bytes"]
            or shards.file_sha256(tar) != entry["sha256"]
        ):
            break
        done.append(record)
    return done


def build_split(
    name: str,
    directory: Path,
    rows: Sequence[Any],
    positions: list[int],
    input_split: str,
    source: Source,
    model: str,
    settings: BuildSettings,
    workers: int,
    tok_info: dict[str, Any],
    build_info: dict[str, Any],
    extra_index: dict[str, Any] | None = None,
    progress: bool = True,
) -> SplitResult:
    """Build (or resume, or skip when complete) the shard set of one split in `directory`."""
    result = SplitResult(name=name, directory=directory)
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = directory / STATE_DIR
    identity = {"build": build_info, "tokenizer": tok_info["fingerprint"], "extra": extra_index}
    index_path = directory / shards.INDEX_NAME
    if index_path.is_file():
        index = shards.read_index(directory)
        if index.get("build") == build_info and index["tokenizer"]["fingerprint"] == tok_info["fingerprint"]:
            result.skipped = True
            result.num_samples = index["num_samples"]
            result.num_images = index["num_images"]
            result.token_lengths = [s["num_tokens"] for sh in index["shards"] for s in sh["samples"]]
            result.num_shards = len(index["shards"])
            result.num_bytes = sum(sh["num_bytes"] for sh in index["shards"])
            result.rejects = Counter(index.get("rejects", {}))
            return result
        raise SystemExit(
            f"--output {directory}: holds a complete shard set built with other settings; "
            "choose another --output or delete it"
        )
    state_dir.mkdir(exist_ok=True)
    settings_file = state_dir / "settings.json"
    if settings_file.is_file():
        if json.loads(settings_file.read_text(encoding="utf-8")) != identity:
            raise SystemExit(
                f"--output {directory}: holds an interrupted build with other settings; "
                "re-run with the same options or delete the directory"
            )
    else:
        if any(shards.SHARD_RE.match(p.name) for p in directory.iterdir()):
            raise SystemExit(
                f"--output {directory}: holds shards from another build; choose an empty directory"
            )
        shards.atomic_write_bytes(settings_file, json.dumps(identity, sort_keys=True).encode("utf-8"))

    finished = _load_finished(directory)
    entries = [r["entry"] for r in finished]
    rejects: list[dict[str, Any]] = [rej for r in finished for rej in r["rejects"]]
    next_index = finished[-1]["next_index"] if finished else 0
    result.resumed_shards = len(finished)
    # Anything after the last intact shard is from the interrupted run: remove it.
    keep = {e["name"] for e in entries}
    for p in directory.iterdir():
        if (shards.SHARD_RE.match(p.name) and p.name not in keep) or ".tmp-" in p.name:
            p.unlink()
    for p in state_dir.glob("shard-*.json"):
        if int(p.stem.split("-")[1]) >= len(finished):
            p.unlink()

    tasks: Iterator[tuple[int, str, Any]] = (
        (i, f"{_key_prefix(input_split)}-{positions[i]:09d}", rows[positions[i]])
        for i in range(next_index, len(positions))
    )
    initargs = (model, settings, source.row_format, source.base_dir)
    pool = None
    if workers > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
        results: Iterator[Any] = _ordered_map(pool, tasks, window=8 * workers)
    else:
        _init_worker(*initargs)
        results = map(_process, tasks)

    current: list[shards.EncodedSample] = []
    current_bytes = 0
    current_rejects: list[dict[str, Any]] = []
    num_seen = next_index
    num_rejected = len(rejects)

    def flush(end_index: int) -> None:
        nonlocal current, current_bytes, current_rejects
        shard_id = len(entries)
        entry = shards.write_shard(directory / shards.SHARD_PATTERN.format(shard_id), current)
        entries.append(entry)
        record = {"entry": entry, "next_index": end_index, "rejects": current_rejects}
        shards.atomic_write_bytes(_state_path(directory, shard_id), json.dumps(record).encode("utf-8"))
        rejects.extend(current_rejects)
        current, current_bytes, current_rejects = [], 0, []

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(positions), initial=next_index, desc=f"build {name}", unit="sample", file=sys.stderr
        )
    try:
        for i, sample, reject in results:
            num_seen = i + 1
            if bar is not None:
                bar.update(1)
            if reject is not None:
                current_rejects.append(reject)
                num_rejected += 1
                if num_seen >= REJECT_CHECK_AFTER and num_rejected / num_seen > settings.max_reject_fraction:
                    _write_rejects(directory, rejects + current_rejects)
                    raise SystemExit(_too_many_rejects(name, num_rejected, num_seen, settings, directory))
                continue
            assert sample is not None
            size = sample.tar_bytes()
            if current and (
                len(current) >= settings.samples_per_shard or current_bytes + size > settings.max_shard_bytes
            ):
                # The shard ends before this row: resume restarts at row i.
                flush(i)
            current.append(sample)
            current_bytes += size
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if current:
        flush(num_seen)
    rejects.extend(current_rejects)
    _write_rejects(directory, rejects)
    total = len(positions)
    if total == 0:
        raise SystemExit(f"split {name}: the source has no rows")
    if len(rejects) / total > settings.max_reject_fraction or not entries:
        raise SystemExit(_too_many_rejects(name, len(rejects), total, settings, directory))
    reject_counts = Counter(r["reason"] for r in rejects)
    index = shards.make_index(entries, tok_info, build_info, extra_index)
    index["num_rejected"] = len(rejects)
    index["rejects"] = dict(sorted(reject_counts.items()))
    shards.write_index(directory, index)  # last: its presence marks the split complete
    shutil.rmtree(state_dir, ignore_errors=True)

    result.num_samples = index["num_samples"]
    result.num_images = index["num_images"]
    result.token_lengths = [s["num_tokens"] for sh in entries for s in sh["samples"]]
    result.rejects = reject_counts
    result.num_shards = len(entries)
    result.num_bytes = sum(e["num_bytes"] for e in entries)
    result.seconds = time.perf_counter() - start
    return result


def _key_prefix(split: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in split)
    return cleaned[:40] or "row"


def _too_many_rejects(name: str, n: int, total: int, settings: BuildSettings, directory: Path) -> str:
    return (
        f"split {name}: {n} of {total} rows rejected (> --max-reject-fraction {settings.max_reject_fraction}); "
        f"see {directory / shards.REJECTS_NAME} for the reasons"
    )


def _write_rejects(directory: Path, rejects: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    shards.atomic_write_bytes(directory / shards.REJECTS_NAME, lines.encode("utf-8"))


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
    )
    return info


def run_build(
    source: Source,
    output: str | Path,
    model: str,
    settings: BuildSettings,
    workers: int = 1,
    extra_index: dict[str, Any] | None = None,
    progress: bool = True,
    force_split_dirs: bool = False,
) -> list[SplitResult]:
    """Build every split of `source` under `output` (`output/<split>/` when there are several)."""
    settings.validate()
    if workers < 1:
        raise SystemExit(f"--workers {workers}: must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool forks after the tokenizer loads
    tokenizer = load_tokenizer(model)
    _WORKER.update(tokenizer=tokenizer, model=model)
    tok_info = tokenizer_info(tokenizer, model)
    plans = plan_splits(source, settings)
    output = Path(output)
    results = []
    for name, (input_split, rows, positions) in plans.items():
        directory = output / name if (len(plans) > 1 or force_split_dirs) else output
        results.append(
            build_split(
                name,
                directory,
                rows,
                positions,
                input_split,
                source,
                model,
                settings,
                workers,
                tok_info,
                build_info_for(source, settings, input_split, name),
                extra_index,
                progress,
            )
        )
    return results


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def summary_table(results: list[SplitResult]) -> str:
    """The end-of-build table: samples, rejects by reason, images, tokens, shards, bytes, seconds."""
    header = [
        "split",
        "samples",
        "rejected",
        "images",
        "tokens",
        "mean",
        "p50",
        "p95",
        "max",
        "shards",
        "MiB",
        "s",
    ]
    rows = []
    for r in results:
        lengths = sorted(r.token_lengths)
        rows.append(
            [
                r.name
                + (" (done)" if r.skipped else f" (+{r.resumed_shards} resumed)" if r.resumed_shards else ""),
                str(r.num_samples),
                str(sum(r.rejects.values())),
                str(r.num_images),
                str(sum(lengths)),
                f"{sum(lengths) / max(1, len(lengths)):.1f}",
                str(_percentile(lengths, 0.5)),
                str(_percentile(lengths, 0.95)),
                str(lengths[-1] if lengths else 0),
                str(r.num_shards),
                f"{r.num_bytes / 2**20:.1f}",
                f"{r.seconds:.1f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        for reason, n in sorted(r.rejects.items()):
            lines.append(f"  {r.name}: rejected {n} x {reason}")
    return "\n".join(lines)


def add_build_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `build` and `synth`."""
    parser.add_argument(
        "--output", required=True, help="output directory (DIR/<split>/ when there are several)"
    )
    parser.add_argument(
        "--model", required=True, help="model folder (or hub id) whose tokenizer and template to use"
    )
    parser.add_argument(
        "--min-pixels", type=int, default=None, help="default: the model's preprocessor (65536)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=None, help="default: the model's preprocessor (16777216)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=images_mod.DEFAULT_MAX_IMAGE_PIXELS,
        help="reject source images above this many pixels (checked before decoding)",
    )
    parser.add_argument("--max-tokens", type=int, default=8192, help="reject longer samples (0 = no limit)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=1000, help="close a shard at this many samples"
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=512 * 1024 * 1024,
        help="... or before it passes this many bytes",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--image-format", choices=sorted(images_mod.IMAGE_FORMATS), default="jpeg", help="stored image format"
    )
    parser.add_argument("--image-quality", type=int, default=95, help="JPEG/WebP quality")
    parser.add_argument(
        "--train-on",
        choices=["last", "all"],
        default="last",
        help="answer mask on the last assistant turn or all of them",
    )
    parser.add_argument(
        "--pad-answer-to",
        type=int,
        default=0,
        help="pad the last answer to N target tokens with <|endoftext|> (LLaDA SFT; 0 = off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the --test-fraction hold-out (and synth)")
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.5,
        help="fail when more of the rows than this are rejected",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def model_pixel_defaults(model: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the model folder's preprocessor_config.json, else Qwen3-VL's."""
    path = Path(model) / "preprocessor_config.json"
    lo, hi = images_mod.DEFAULT_MIN_PIXELS, images_mod.DEFAULT_MAX_PIXELS
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        size = cfg.get("size") or {}
        lo = int(size.get("shortest_edge", cfg.get("min_pixels", lo)))
        hi = int(size.get("longest_edge", cfg.get("max_pixels", hi)))
    return lo, hi


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    """BuildSettings from parsed `build`/`synth` options."""
    lo, hi = model_pixel_defaults(args.model)
    return BuildSettings(
        min_pixels=args.min_pixels if args.min_pixels is not None else lo,
        max_pixels=args.max_pixels if args.max_pixels is not None else hi,
        max_image_pixels=args.max_image_pixels,
        max_tokens=args.max_tokens or None,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        image_format=args.image_format,
        image_quality=args.image_quality,
        train_on=args.train_on,
        pad_answer_to=args.pad_answer_to,
        seed=args.seed,
        limit=getattr(args, "limit", None),
        test_fraction=getattr(args, "test_fraction", 0.0),
        max_reject_fraction=args.max_reject_fraction,
    )


def main(argv: list[str]) -> int:
    """`python -m data_tools build --source SPEC --output DIR --model PATH [options]`."""
    parser = argparse.ArgumentParser(prog="python -m data_tools build", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source", required=True, help="save_to_disk folder, parquet/arrow, JSON/JSONL, hub name"
    )
    parser.add_argument(
        "--format",
        choices=["messages", "llava", "kodoc"],
        default=None,
        help="row layout (default: detected from the first row)",
    )
    parser.add_argument("--split", default=None, help="comma-separated input splits (default: all)")
    parser.add_argument(
        "--image-root", default=None, help="folder for relative image paths (default: the file's)"
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.0, help="hold out this fraction as DIR/test/"
    )
    parser.add_argument("--limit", type=int, default=None, help="read at most N rows per input split")
    add_build_options(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    settings.validate()
    splits = args.split.split(",") if args.split else None
    source = open_source(args.source, args.format, splits, args.image_root)
    print(source.describe() + ("" if args.format else " [format detected]"), file=sys.stderr)
    results = run_build(
        source, args.output, args.model, settings, args.workers, progress=not args.no_progress
    )
    print(summary_table(results))
    return 0
