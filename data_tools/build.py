"""`python -m data_tools build`: source rows -> samples (in a process pool) -> atomic shards + index.

Order and output are deterministic: rows are processed in input order (`_ordered_map` keeps it), shard
boundaries depend only on the samples, so any `--workers` gives byte-identical shards. An
interrupted build resumes after its last finished shard (`data_tools.output_dir`); `index.json` is
written last and `.build/` removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from data_tools import images as images_mod
from data_tools import shards
from data_tools.errors import BuildError
from data_tools.fileio import atomic_write_text
from data_tools.index import INDEX_NAME, make_index, read_index, write_index
from data_tools.output_dir import (
    STATE_DIR,
    claim_directory,
    discard_unfinished,
    load_finished,
    prepare_output,
    state_path,
    what_changed,
)
from data_tools.report import SplitResult, result_from_index, summary_table
from data_tools.samples import SampleError, load_tokenizer, tokenize_conversation, tokenizer_info
from data_tools.settings import (
    BuildSettings,
    add_build_options,
    build_info_for,
    settings_from_args,
    with_model_pixels,
)
from data_tools.sources import (
    INPUT_FORMATS,
    Conversation,
    Source,
    load_image_bytes,
    normalise_row,
    open_source,
    row_source_id,
)

REJECT_CHECK_AFTER = 200  # rows seen before the reject fraction may abort a build early


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
        data = load_image_bytes(ref, settings.max_image_bytes)
        processed.append(
            images_mod.process_image(
                data,
                min_pixels=settings.min_pixels,
                max_pixels=settings.max_pixels,
                image_format=settings.image_format,
                quality=settings.image_quality,
                max_image_pixels=settings.max_image_pixels,
                first_frame=settings.first_frame,
            )
        )
    tokens = tokenize_conversation(
        tokenizer,
        conv.messages,
        [p.num_tokens for p in processed],
        settings.train_on,
        padding=settings.padding_for(key),
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


class _PreparedSample(shards.EncodedSample):
    """A sample whose tar members (its JSON serialised) are made once, in the worker: the main
    process writes every shard alone and asks for the members twice (`tar_bytes`, `write_shard`),
    so serialising there capped how many workers the pool could keep busy."""

    def __init__(self, sample: shards.EncodedSample) -> None:
        super().__init__(json=sample.json, images=sample.images)
        self._members = super().members()

    def members(self) -> list[tuple[str, bytes]]:
        return self._members


def _process(task: tuple[int, str, Any]) -> tuple[int, shards.EncodedSample | None, dict[str, Any] | None]:
    """Worker entry: `(position, key, row)` -> `(position, sample, None)` or `(position, None, reject)`."""
    position, key, row = task
    source_id = row_source_id(row, key)
    try:
        settings: BuildSettings = _WORKER["settings"]
        conv = normalise_row(
            row,
            _WORKER["row_format"],
            _WORKER["base_dir"],
            fallback_id=key,
            allow_outside_root=settings.allow_outside_root,
        )
        source_id = conv.source_id
        sample = _PreparedSample(encode_conversation(conv, key, _WORKER["tokenizer"], settings))
        return position, sample, None
    except (SampleError, images_mod.ImageError) as e:
        return position, None, {"key": key, "source_id": source_id, "reason": e.reason, "detail": str(e)}
    except Exception as e:  # a bug, not a bad row: still never let it kill a long build; listed for a report
        detail = f"{e!r} (an unexpected error: please report it with this row)"
        return (
            position,
            None,
            {"key": key, "source_id": source_id, "reason": "internal_error", "detail": detail},
        )


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
                raise BuildError("--test-fraction holds out part of one split; give a single --split")
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
            raise BuildError(
                f"a build worker died ({e}); re-run to resume, or use --workers 1 to find the row"
            ) from e
        submit()
        yield from done


class _ShardCutter:
    """Cuts the ordered stream of encoded rows into shards, committing a resume record after each.

    Committed: `entries` and `rejects` (also those of the shards a resumed build kept); open: the
    samples and rejects since the last commit. `num_seen` counts input rows, resumed ones included.
    """

    def __init__(self, directory: Path, settings: BuildSettings, finished: list[dict[str, Any]]) -> None:
        self.directory = directory
        self.settings = settings
        self.entries: list[dict[str, Any]] = [r["entry"] for r in finished]
        self.rejects: list[dict[str, Any]] = [rej for r in finished for rej in r["rejects"]]
        self.num_seen: int = finished[-1]["next_index"] if finished else 0
        self.open_samples: list[shards.EncodedSample] = []
        self.open_bytes = 0
        self.open_rejects: list[dict[str, Any]] = []

    def add(self, position: int, sample: shards.EncodedSample | None, reject: dict[str, Any] | None) -> None:
        """Take the result of input row `position` (a sample or a reject)."""
        self.num_seen = position + 1
        if reject is not None:
            self.open_rejects.append(reject)
            return
        assert sample is not None
        size = sample.tar_bytes()
        if self.open_samples and (
            len(self.open_samples) >= self.settings.samples_per_shard
            or self.open_bytes + size > self.settings.max_shard_bytes
        ):
            # The shard ends before this row: resume restarts at row `position`.
            self.commit(position)
        self.open_samples.append(sample)
        self.open_bytes += size

    def all_rejects(self) -> list[dict[str, Any]]:
        """Committed and open rejects, in input order."""
        return self.rejects + self.open_rejects

    def rejects_exceeded(self) -> bool:
        """Whether enough rows were seen to judge and too many of them were rejected."""
        num_rejected = len(self.rejects) + len(self.open_rejects)
        return (
            self.num_seen >= REJECT_CHECK_AFTER
            and num_rejected / self.num_seen > self.settings.max_reject_fraction
        )

    def commit(self, end_index: int) -> None:
        """Write the open shard, then its resume record (`end_index`: the first row after it)."""
        shard_id = len(self.entries)
        entry = shards.write_shard(self.directory / shards.SHARD_PATTERN.format(shard_id), self.open_samples)
        self.entries.append(entry)
        record = {"entry": entry, "next_index": end_index, "rejects": self.open_rejects}
        atomic_write_text(state_path(self.directory, shard_id), json.dumps(record))
        self.rejects.extend(self.open_rejects)
        self.open_samples, self.open_bytes, self.open_rejects = [], 0, []

    def close(self) -> None:
        """Commit the last, partly filled shard; rejects after it join the committed ones."""
        if self.open_samples:
            self.commit(self.num_seen)
        self.rejects.extend(self.open_rejects)
        self.open_rejects = []


@contextlib.contextmanager
def _encoded_rows(
    tasks: Iterator[tuple[int, str, Any]], initargs: tuple[Any, ...], workers: int
) -> Iterator[Iterator[Any]]:
    """`(position, sample, reject)` per task in input order, from a process pool when `workers > 1`."""
    if workers <= 1:
        _init_worker(*initargs)
        yield map(_process, tasks)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
    try:
        yield _ordered_map(pool, tasks, window=8 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_and_cut(
    name: str,
    cutter: _ShardCutter,
    tasks: Iterator[tuple[int, str, Any]],
    initargs: tuple[Any, ...],
    workers: int,
    total: int,
    progress: bool,
    locate: Callable[[int], str],
) -> None:
    """Encode every task and feed `cutter`; end the build early when too many rows are rejected.

    `locate(position)` says where a rejected row is in the source (e.g. `data.jsonl line 12`)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=cutter.num_seen, desc=f"build {name}", unit="sample", file=sys.stderr)
    try:
        with _encoded_rows(tasks, initargs, workers) as results:
            for position, sample, reject in results:
                if bar is not None:
                    bar.update(1)
                if reject is not None:
                    reject["where"] = locate(position)
                cutter.add(position, sample, reject)
                if reject is not None and cutter.rejects_exceeded():
                    rejects = cutter.all_rejects()
                    _write_rejects(cutter.directory, rejects)
                    raise BuildError(
                        _too_many_rejects(
                            name, len(rejects), cutter.num_seen, cutter.settings, cutter.directory
                        )
                    )
    finally:
        if bar is not None:
            bar.close()


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
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / INDEX_NAME).is_file():
        index = read_index(directory)
        if index.get("build") == build_info and index["tokenizer"]["fingerprint"] == tok_info["fingerprint"]:
            result = result_from_index(name, directory, index)
            result.skipped = True
            return result
        raise BuildError(
            f"--output {directory}: holds a complete shard set, and "
            f"{what_changed(index.get('build') or {}, build_info)}; add --force to rebuild it, or choose another --output"
        )
    claim_directory(
        directory, {"build": build_info, "tokenizer": tok_info["fingerprint"], "extra": extra_index}
    )
    finished = load_finished(directory)
    discard_unfinished(directory, finished)

    cutter = _ShardCutter(directory, settings, finished)
    tasks: Iterator[tuple[int, str, Any]] = (
        (i, f"{_key_prefix(input_split)}-{positions[i]:09d}", rows[positions[i]])
        for i in range(cutter.num_seen, len(positions))
    )
    initargs = (model, settings, source.row_format, source.base_dir)
    where = getattr(rows, "where", None)

    def locate(i: int) -> str:
        return where(positions[i]) if where is not None else f"{input_split} row {positions[i]}"

    _encode_and_cut(name, cutter, tasks, initargs, workers, len(positions), progress, locate)
    cutter.close()
    _write_rejects(directory, cutter.rejects)
    total = len(positions)
    if total == 0:
        raise BuildError(f"split {name}: the source has no rows")
    if len(cutter.rejects) / total > settings.max_reject_fraction or not cutter.entries:
        raise BuildError(_too_many_rejects(name, len(cutter.rejects), total, settings, directory))
    reject_counts = Counter(r["reason"] for r in cutter.rejects)
    rejects = {"num_rejected": len(cutter.rejects), "rejects": dict(sorted(reject_counts.items()))}
    index, table = make_index(cutter.entries, tok_info, build_info, {**(extra_index or {}), **rejects})
    write_index(directory, index, table)  # last: its presence marks the split complete
    shutil.rmtree(directory / STATE_DIR, ignore_errors=True)

    result = result_from_index(name, directory, index)
    result.resumed_shards = len(finished)
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
    atomic_write_text(directory / shards.REJECTS_NAME, lines)


def run_build(
    source: Source,
    output: str | Path,
    model: str,
    settings: BuildSettings,
    workers: int = 1,
    extra_index: dict[str, Any] | None = None,
    progress: bool = True,
    force_split_dirs: bool = False,
    force: bool = False,
) -> list[SplitResult]:
    """Build every split of `source` under `output` (`output/<split>/` when there are several).

    `force` removes the shard sets earlier builds left in `output` (complete, interrupted, or of the
    other layout) and builds from scratch."""
    settings.validate()
    if workers < 1:
        raise BuildError(f"--workers {workers}: must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool forks after the tokenizer loads
    tokenizer = load_tokenizer(model)
    _WORKER.update(tokenizer=tokenizer, model=model)
    tok_info = tokenizer_info(tokenizer, model)
    plans = plan_splits(source, settings)
    output = Path(output)
    split_dirs = len(plans) > 1 or force_split_dirs
    prepare_output(output, [output / name for name in plans] if split_dirs else [output], force)
    results = []
    for name, (input_split, rows, positions) in plans.items():
        directory = output / name if split_dirs else output
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


def main(argv: list[str]) -> int:
    """`python -m data_tools build --source SPEC --output DIR --model PATH [options]`."""
    parser = argparse.ArgumentParser(prog="python -m data_tools build", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source", required=True, help="save_to_disk folder, parquet/arrow, JSON/JSONL, hub name"
    )
    parser.add_argument(
        "--format",
        choices=INPUT_FORMATS,
        default=None,
        help="row layout (default: detected from the first row)",
    )
    parser.add_argument("--split", default=None, help="comma-separated input splits (default: all)")
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder that relative image paths start from and that every image must lie in, after "
        "following symlinks (default: the JSON/JSONL file's folder, or the dataset folder; a relative "
        "--image-root is taken from the current directory)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="remove the shard sets earlier builds left in --output (complete, interrupted or of the "
        "other layout) and build from scratch",
    )
    defaults = BuildSettings()
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=defaults.test_fraction,
        help="hold out this fraction as DIR/test/ (default: %(default)s)",
    )
    parser.add_argument(
        "--limit", type=int, default=defaults.limit, help="read at most N rows per input split"
    )
    add_build_options(parser, defaults, pixels_from_model=True)
    args = parser.parse_args(argv)
    settings = settings_from_args(args, with_model_pixels(defaults, args.model))
    settings.validate()
    splits = args.split.split(",") if args.split else None
    source = open_source(args.source, args.format, splits, args.image_root)
    print(source.describe() + ("" if args.format else " [format detected]"), file=sys.stderr)
    results = run_build(
        source,
        args.output,
        args.model,
        settings,
        args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    print(summary_table(results))
    return 0
