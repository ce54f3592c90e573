"""Shard-build throughput on document-like images (about 1280x960, text-heavy).

Renders N pages of Korean/English text and tables (NanumGothic) as JPEG files plus a JSONL
`messages` dataset, then times `data_tools` builds with 1 and 2 worker processes (decode, safe
checks, smart_resize, encode, tokenise, tar, sha256) and prints samples/s and the per-worker rate.
Goal: >= 40 samples/s per worker, near-linear to 2 workers.

    python benchmarks/shard_build.py [--num 240] [--model DIR] [--workers 1,2] [--image-format jpeg]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from data_tools.build import BuildSettings, run_build
from data_tools.samples import load_tokenizer, tokenizer_info
from data_tools.sources import open_source
from data_tools.synth import nanum_font

WORDS_EN = [
    "revenue",
    "quarter",
    "total",
    "region",
    "sales",
    "growth",
    "cost",
    "margin",
    "report",
    "table",
    "page",
    "summary",
]
WORDS_KO = ["매출", "분기", "합계", "지역", "판매", "성장", "비용", "이익", "보고서", "표", "페이지", "요약"]


def render_page(rng: random.Random, width: int = 1280, height: int = 960) -> Image.Image:
    """A white page with a title, paragraphs and a ruled table."""
    page = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(page)
    draw.text(
        (60, 40),
        f"{rng.choice(WORDS_KO)} {rng.choice(WORDS_EN)} {rng.randint(2000, 2030)}",
        font=nanum_font(36),
        fill=(10, 10, 10),
    )
    y = 110
    body = nanum_font(18)
    for _ in range(14):
        words = [rng.choice(WORDS_EN + WORDS_KO) for _ in range(rng.randint(10, 16))]
        draw.text((60, y), " ".join(words), font=body, fill=(30, 30, 30))
        y += 26
    rows, cols, top = 10, 5, y + 20
    cell_w, cell_h = (width - 120) // cols, 34
    for r in range(rows + 1):
        draw.line([(60, top + r * cell_h), (60 + cols * cell_w, top + r * cell_h)], fill=(0, 0, 0), width=1)
    for c in range(cols + 1):
        draw.line([(60 + c * cell_w, top), (60 + c * cell_w, top + rows * cell_h)], fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            text = rng.choice(WORDS_KO) if c == 0 else f"{rng.randint(0, 99999):,}"
            draw.text((68 + c * cell_w, top + r * cell_h + 7), text, font=body, fill=(20, 20, 20))
    return page


def make_dataset(directory: Path, num: int, seed: int = 0, page_format: str = "jpg") -> Path:
    """`num` distinct pages as JPEG (or PNG) files and a JSONL dataset that asks about them."""
    rng = random.Random(seed)
    (directory / "pages").mkdir(parents=True)
    rows = []
    for i in range(num):
        name = f"pages/p{i:05d}.{page_format}"
        render_page(rng).save(directory / name, **({"quality": 90} if page_format == "jpg" else {}))
        rows.append(
            {
                "id": f"page-{i}",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": name},
                            {"type": "text", "text": "표의 첫 번째 행의 합계는 얼마입니까?"},
                        ],
                    },
                    {"role": "assistant", "content": f"{rng.randint(0, 999999):,}원입니다."},
                ],
            }
        )
    path = directory / "pages.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    """Build the same dataset with each worker count and print the rates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=240)
    parser.add_argument("--model", default=None, help="model folder (default: a fresh make-tiny folder)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--image-format", default="jpeg", help="stored format (jpeg keeps on-grid JPEG bytes)"
    )
    parser.add_argument("--page-format", default="jpg", choices=["jpg", "png"], help="source page files")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    try:
        model = args.model
        if model is None:
            from trainer.assets import make_tiny  # the benchmark may use trainer; data_tools may not

            model = str(make_tiny(work / "model"))
        t0 = time.perf_counter()
        source_path = make_dataset(work / "data", args.num, page_format=args.page_format)
        print(
            f"rendered {args.num} pages of 1280x960 in {time.perf_counter() - t0:.1f}s "
            f"({os.cpu_count()} CPUs, {args.page_format} pages -> {args.image_format})"
        )
        source = open_source(str(source_path))
        # Load the tokenizer and its fingerprint once (cached), outside the timed builds.
        tokenizer_info(load_tokenizer(model), model)
        settings = BuildSettings(image_format=args.image_format, samples_per_shard=100)
        # CPU seconds of this process and its (reaped) workers: on a shared machine wall-clock scaling
        # is bounded by the free cores, CPU time per sample is not.
        print(
            f"{'workers':>7} {'samples':>7} {'seconds':>8} {'samples/s':>10} {'per worker':>10} "
            f"{'CPU ms/sample':>13} {'MiB':>7}"
        )
        for workers in [int(w) for w in args.workers.split(",")]:
            out = work / f"out-{len(list(work.glob('out-*')))}"
            cpu0 = _cpu_seconds()
            (result,) = run_build(source, out, model, settings, workers=workers, progress=False)
            cpu_ms = 1000 * (_cpu_seconds() - cpu0) / result.num_samples
            rate = result.num_samples / result.seconds
            print(
                f"{workers:>7} {result.num_samples:>7} {result.seconds:>8.2f} {rate:>10.1f} "
                f"{rate / workers:>10.1f} {cpu_ms:>13.1f} {result.num_bytes / 2**20:>7.1f}"
            )
        print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
