"""Loader benchmark: read throughput per worker on document-like samples, the loader against the bare
JPEG decode, and packing efficiency.

    python benchmarks/loader.py --model TINY_DIR [--samples 96] [--workers 0 2] [--pages 32] [--passes 3]
        [--max-pixels 1003520] [--json OUT]

1. Throughput: a real shard set of document-QA-like samples (a scanned page from scikit-image,
   resized to Qwen grids of 300-1900 tokens, stored as JPEG; short and long questions) is written
   with data_tools' writer, then `TrainLoader` reads, decodes, preprocesses and collates it with
   `num_workers` = 0 (the main process: the cost of one worker) and the given worker counts.
2. Loader vs decode, per worker (num_workers=0): `--pages` samples of one 1280x960 document page
   (the scikit-image page), put on the Qwen grid at the README's `--max-pixels` by data_tools' own
   image step (JPEG), read one sample per row; the loader's time per sample against the bare decode
   of the same JPEG bytes (PIL open + convert RGB + np.asarray), timed in turns (medians), as a ratio
   (goal: at most 2x). Torch runs on one thread there, as in a DataLoader worker.
3. Packing efficiency (index only): real tokens / row tokens for best-fit packing into rows of
   `max_tokens`, against padding each micro-batch of samples to its longest sample, on a
   document-QA length mix (40% short text QA, 50% one page, 10% multi-page).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_tools import shards
from data_tools.images import process_image
from data_tools.index import make_index, write_index
from data_tools.samples import tokenize_conversation, tokenizer_info
from trainer.data import Planner, PlanSpec, TrainLoader, load_catalog
from trainer.model.processor import load_processor


def page_image() -> Image.Image:
    """A real scanned text page (scikit-image's `page`), as RGB."""
    from skimage import data

    return Image.fromarray(data.page()).convert("RGB")


def document_sample(
    tokenizer: Any, page: Image.Image, key: str, rng: np.random.Generator
) -> shards.EncodedSample:
    """One document-QA sample: 1-2 page images on the Qwen grid (JPEG) and a question with an answer."""
    grids = []
    images = []
    for _ in range(1 if rng.random() < 0.85 else 2):
        h = int(rng.integers(20, 50)) * 2  # 16-px patches, even (merge 2): ~280-1700 tokens per page
        w = max(2, int(h * rng.uniform(0.6, 0.8)) // 2 * 2)
        buf = io.BytesIO()
        page.resize((16 * w, 16 * h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        grids.append((h, w))
    return qa_sample(tokenizer, key, images, grids, rng)


def qa_sample(
    tokenizer: Any, key: str, jpegs: list[bytes], grids: list[tuple[int, int]], rng: np.random.Generator
) -> shards.EncodedSample:
    """A question (8-120 words) on JPEG images of the given grids (16-px patches), with a short answer."""
    words = [
        "what",
        "is",
        "the",
        "total",
        "amount",
        "due",
        "on",
        "the",
        "invoice",
        "for",
        "the",
        "second",
        "quarter",
    ]
    question = " ".join(rng.choice(words, int(rng.integers(8, 120))))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"} for _ in grids] + [{"type": "text", "text": question}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": f"{int(rng.integers(1, 10**6))} won"}]},
    ]
    tokens = tokenize_conversation(tokenizer, messages, [h * w // 4 for h, w in grids])
    sample_json = {
        "key": key, "source_id": key, "messages": messages, "input_ids": tokens.input_ids,
        "answer_mask": tokens.answer_mask, "image_grid_thw": [[1, h, w] for h, w in grids],
        "num_tokens": len(tokens.input_ids), "images": [f"{i}.jpg" for i in range(len(grids))],
    }  # fmt: skip
    return shards.EncodedSample(json=sample_json, images=[("jpg", jpeg) for jpeg in jpegs])


def write_documents(directory: Path, tokenizer: Any, num_samples: int, per_shard: int = 32) -> None:
    """A shard set of `num_samples` document-like samples."""
    rng = np.random.default_rng(0)
    page = page_image()
    entries = []
    for shard_id, start in enumerate(range(0, num_samples, per_shard)):
        samples = [
            document_sample(tokenizer, page, f"doc{i:06d}", rng)
            for i in range(start, min(num_samples, start + per_shard))
        ]
        entries.append(shards.write_shard(directory / shards.SHARD_PATTERN.format(shard_id), samples))
    write_index(directory, *make_index(entries, tokenizer_info(tokenizer, "bench"), {}))


README_MAX_PIXELS = 1_003_520
"""`--max-pixels` of the README's build example (document/table QA pages)."""


def grid_page(max_pixels: int) -> tuple[bytes, tuple[int, int]]:
    """The scanned page as a 1280x960 document, put on the Qwen grid by the build's own image step:
    (its JPEG bytes, its (h, w) grid in 16-px patches)."""
    buf = io.BytesIO()
    page_image().resize((1280, 960), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=95)
    image = process_image(buf.getvalue(), max_pixels=max_pixels)
    return image.data, (image.height // 16, image.width // 16)


def write_pages(
    directory: Path, tokenizer: Any, num_samples: int, jpeg: bytes, grid: tuple[int, int]
) -> None:
    """A one-shard set of `num_samples` questions on the same page."""
    rng = np.random.default_rng(0)
    samples = [qa_sample(tokenizer, f"page{i:06d}", [jpeg], [grid], rng) for i in range(num_samples)]
    entry = shards.write_shard(directory / shards.SHARD_PATTERN.format(0), samples)
    write_index(directory, *make_index([entry], tokenizer_info(tokenizer, "bench"), {}))


def loader_vs_decode(
    directory: Path, processor: Any, jpeg: bytes, passes: int, max_tokens: int
) -> dict[str, float]:
    """Seconds per sample of the loader in the main process (one worker's cost; one sample per row) and
    of the bare decode of the same JPEG bytes, timed in turns (one sample, one decode) so that both
    see the same machine; medians over `passes` passes (a shared machine's noise only adds time)."""
    loader = TrainLoader(
        [directory], rank=0, world_size=1, micro_batch=1, grad_accum=1, max_tokens=max_tokens, seed=0,
        processor=processor, num_workers=0, packing=False, max_epochs=passes,
    )  # fmt: skip
    loads, decodes = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as PyTorch sets it in every DataLoader worker
    try:
        steps = iter(loader)
        while True:
            start = time.perf_counter()
            if next(steps, None) is None:
                break
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            decodes.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    load, decode = float(np.median(loads)), float(np.median(decodes))
    return {"loader_s_per_sample": load, "decode_s_per_sample": decode, "ratio": load / decode}


def throughput(directory: Path, processor: Any, num_workers: int, max_tokens: int) -> dict[str, float]:
    """Samples/s and tokens/s of one pass over the set (rows of `max_tokens`, 1 rank, 1 row per micro-batch)."""
    loader = TrainLoader(
        [directory], rank=0, world_size=1, micro_batch=1, grad_accum=1, max_tokens=max_tokens, seed=0,
        processor=processor, num_workers=num_workers, max_epochs=1, drop_remainder=True,
    )  # fmt: skip
    start = time.perf_counter()
    num_samples = num_tokens = 0
    for item in loader:
        for mb in item.micro_batches:
            num_samples += sum(len(k) for k in mb.keys)
            num_tokens += mb.num_real_tokens
    seconds = time.perf_counter() - start
    per = max(1, num_workers)
    return {
        "num_workers": num_workers,
        "samples_per_s": num_samples / seconds,
        "tokens_per_s": num_tokens / seconds,
        "samples_per_s_per_worker": num_samples / seconds / per,
        "tokens_per_s_per_worker": num_tokens / seconds / per,
    }


def doc_qa_lengths(n: int, seed: int) -> np.ndarray:
    """Token lengths of a document-QA mix: 40% short text QA, 50% one page, 10% multi-page."""
    rng = np.random.default_rng(seed)
    kind = rng.random(n)
    short = rng.integers(40, 200, n)
    page = rng.integers(300, 1500, n)
    multi = rng.integers(1500, 3800, n)
    return np.where(kind < 0.4, short, np.where(kind < 0.9, page, multi))


def packing_vs_padding(
    directory: Path, lengths: np.ndarray, max_tokens: int, micro_batch: int, window: int
) -> dict[str, float]:
    """Best-fit packing efficiency (planner on an index of `lengths`) vs padding batches to their longest."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = [
        {"key": f"k{i}", "offset": 0, "num_bytes": 0, "num_tokens": int(n), "num_answer_tokens": 1,
         "num_images": 0, "image_grid_thw": []}
        for i, n in enumerate(lengths)
    ]  # fmt: skip
    entry = {"name": "shard-000000.tar", "num_bytes": 0, "sha256": "", "samples": samples}
    write_index(directory, *make_index([entry], {"fingerprint": None, "name_or_path": ""}, {}))
    start = time.perf_counter()
    planner = Planner(load_catalog([directory]), PlanSpec((1.0,), 0, max_tokens, micro_batch, window=window))
    plan = planner.plan(0)
    plan_seconds = time.perf_counter() - start
    order = lengths[planner.epoch_samples(0)]  # the same shuffled order the packer saw
    batches = [order[i : i + micro_batch] for i in range(0, len(order) - micro_batch + 1, micro_batch)]
    padded = sum(int(b.sum()) for b in batches) / sum(len(b) * int(b.max()) for b in batches)
    return {
        "num_samples": len(lengths),
        "max_tokens": max_tokens,
        "window": window,
        "packing_efficiency": plan.packing_efficiency,
        "padding_efficiency": padded,
        "samples_per_pack": plan.num_samples / plan.num_own_packs,
        "plan_seconds": plan_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="model folder (tokenizer + image processor), e.g. make-tiny"
    )
    parser.add_argument("--samples", type=int, default=96, help="document samples for the throughput pass")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to time")
    parser.add_argument("--pages", type=int, default=32, help="page samples for loader vs decode (0: skip)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the pages (loader vs decode)")
    parser.add_argument(
        "--max-pixels", type=int, default=README_MAX_PIXELS, help="pixel budget of the pages (README's build)"
    )
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4, help="batch size of the padding baseline")
    parser.add_argument(
        "--length-samples", type=int, default=100_000, help="samples in the packing comparison"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    processor = load_processor(args.model)
    results: dict[str, Any] = {"throughput": [], "packing": [], "loader_vs_decode": None}
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        write_documents(docs, processor.tokenizer, args.samples)
        catalog = load_catalog([docs])
        print(f"{len(catalog)} document samples, mean {catalog.num_tokens.mean():.0f} tokens")
        for num_workers in args.workers:
            r = throughput(docs, processor, num_workers, args.max_tokens)
            results["throughput"].append(r)
            print(
                f"workers={num_workers}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tokens/s "
                f"({r['samples_per_s_per_worker']:.1f} samples/s, {r['tokens_per_s_per_worker']:.0f} tokens/s per worker)"
            )
        if args.pages:
            jpeg, (h, w) = grid_page(args.max_pixels)
            pages = Path(tmp) / "pages"
            pages.mkdir()
            write_pages(pages, processor.tokenizer, args.pages, jpeg, (h, w))
            r = loader_vs_decode(pages, processor, jpeg, args.passes, args.max_tokens)
            results["loader_vs_decode"] = {
                "pages": args.pages,
                "max_pixels": args.max_pixels,
                "grid": [h, w],
                **r,
            }
            print(
                f"per worker, {args.pages} 1280x960 JPEG pages at max_pixels {args.max_pixels} ({16 * w}x{16 * h} px, "
                f"{len(jpeg) // 1024} KiB): loader {1e3 * r['loader_s_per_sample']:.1f} ms/sample, bare JPEG "
                f"decode {1e3 * r['decode_s_per_sample']:.1f} ms: {r['ratio']:.2f}x the decode (goal <= 2x)"
            )
        lengths = doc_qa_lengths(args.length_samples, seed=0)
        for window in (1, 16, 64):
            r = packing_vs_padding(
                Path(tmp) / f"lengths-{window}", lengths, args.max_tokens, args.micro_batch, window
            )
            results["packing"].append(r)
            print(
                f"doc-QA mix, {r['num_samples']} samples, rows of {args.max_tokens}: best-fit window {window}: "
                f"packing efficiency {r['packing_efficiency']:.3f} ({r['samples_per_pack']:.2f} samples/row, "
                f"plan {r['plan_seconds']:.2f} s); padding batches of {args.micro_batch} to the longest: "
                f"{r['padding_efficiency']:.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
