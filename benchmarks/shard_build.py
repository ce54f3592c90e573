"""Shard-build throughput on document-like images (about 1280x960, text-heavy).

Renders N pages of Korean/English text and tables (NanumGothic) as JPEG files plus a JSONL
`messages` dataset, then builds it side by side with 1, 2 (and 4, given 4 usable cores) worker
processes (decode, safe checks, smart_resize, encode, tokenise, tar, sha256), checks that every
build wrote the same bytes, and prints rows/s, the per-worker rate, the speed-up over the first
worker count, the usable cores and the load average before each build (others' jobs take cores).
Goal: >= 40 rows/s per worker, near-linear to 2 workers on an idle machine.

    python benchmarks/shard_build.py [--num 240] [--model DIR] [--workers 1,2,4] [--repeat 1]
        [--image-format jpeg]
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
from data_tools.fileio import file_sha256
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
    parser.add_argument(
        "--workers", default=None, help="comma-separated worker counts (default: 1,2 and 4 given 4 cores)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="build with each count this many times, in turn (best kept)"
    )
    parser.add_argument(
        "--image-format", default="jpeg", help="stored format (jpeg keeps on-grid JPEG bytes)"
    )
    parser.add_argument("--page-format", default="jpg", choices=["jpg", "png"], help="source page files")
    args = parser.parse_args()
    from trainer.data.loader import usable_cpu_count  # the benchmark may use trainer; data_tools may not

    cores = usable_cpu_count()
    default_counts = [1, 2, 4] if cores >= 4 else [1, 2]
    counts = [int(w) for w in args.workers.split(",")] if args.workers else default_counts
    work = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    try:
        model = args.model
        if model is None:
            from trainer.model.tiny import make_tiny

            model = str(make_tiny(work / "model"))
        t0 = time.perf_counter()
        source_path = make_dataset(work / "data", args.num, page_format=args.page_format)
        print(
            f"rendered {args.num} pages of 1280x960 in {time.perf_counter() - t0:.1f}s "
            f"({args.page_format} pages -> {args.image_format})"
        )
        source = open_source(str(source_path))
        # Load the tokenizer and its fingerprint once (cached), outside the timed builds.
        tokenizer_info(load_tokenizer(model), model)
        settings = BuildSettings(image_format=args.image_format, samples_per_shard=100)
        # CPU seconds of this process and its (reaped) workers: on a shared machine wall-clock scaling
        # is bounded by the free cores, CPU time per row is not.
        print(
            f"{'workers':>7} {'rows':>6} {'seconds':>8} {'rows/s':>8} {'per worker':>10} "
            f"{'CPU ms/row':>10} {'MiB':>7} {'load before':>11}"
        )
        best: dict[int, float] = {}
        first_build: dict[str, str] = {}  # file name -> sha256 of the first build's output
        for _ in range(args.repeat):
            for workers in counts:
                out = work / "out"
                load = os.getloadavg()[0]
                cpu0 = _cpu_seconds()
                (result,) = run_build(source, out, model, settings, workers=workers, progress=False)
                rows = result.num_samples + sum(result.rejects.values())
                cpu_ms = 1000 * (_cpu_seconds() - cpu0) / rows
                rate = rows / result.seconds
                best[workers] = max(best.get(workers, 0.0), rate)
                print(
                    f"{workers:>7} {rows:>6} {result.seconds:>8.2f} {rate:>8.1f} {rate / workers:>10.1f} "
                    f"{cpu_ms:>10.1f} {result.num_bytes / 2**20:>7.1f} {load:>11.1f}"
                )
                built = {p.name: file_sha256(p) for p in sorted(out.iterdir())}
                shutil.rmtree(out)
                if not first_build:
                    first_build = built
                elif built != first_build:
                    raise SystemExit(f"--workers {workers} wrote other files than --workers {counts[0]}")
        print(f"every build wrote the same {len(first_build)} files, byte for byte")
        base = counts[0]
        for workers in counts[1:]:
            print(
                f"{workers} vs {base} workers: x{best[workers] / best[base]:.2f} rows/s "
                f"(best of {args.repeat} each)"
            )
        load1, load5, _ = os.getloadavg()
        print(f"{cores} usable CPU cores; load average now {load1:.1f} (1 min), {load5:.1f} (5 min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
