"""Index scale benchmark: load time, memory and epoch-plan time of one rank at millions of samples.

    python benchmarks/index_scale.py [--samples 2000000 10000000] [--json OUT]

For each size, a synthetic shard-set index with document-QA lengths (40% text-only questions, 50% one
page image, 10% two pages; grids of 20-48 x 14-38 patches) is written with the project's own writer
(`data_tools.index.make_index` + `write_index`, shard entries of 4,096 samples as the build emits
them; no tar is needed: the catalog and the plan read the index only). Then a fresh process, as a
rank does at start-up:
- `load_catalog` (wall time; peak RSS above the imports, `VmHWM` - `VmRSS` before),
- the epoch plan (`Planner.plan(0)`, wall and CPU seconds: mixing permutation + best-fit packing
  into 4,096-token rows, 64 packs per global step = micro-batch 4 x accumulation 2 x 8 ranks),
- a forked child standing in for a DataLoader worker (the loader forks on Linux) makes the sample
  refs of its rank's first 200 steps; its `Private_Dirty` memory (/proc/self/smaps_rollup)
  shows what the worker adds beyond the pages it shares with the rank.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES_PER_SHARD = 4096
MAX_TOKENS = 4096
PACKS_PER_STEP = 4 * 2 * 8


def shard_entries(num_samples: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Index shard entries as `data_tools.shards.write_shard` returns them (document-QA lengths)."""
    rng = np.random.default_rng(seed)
    for shard_id, lo in enumerate(range(0, num_samples, SAMPLES_PER_SHARD)):
        n = min(SAMPLES_PER_SHARD, num_samples - lo)
        kind = rng.random(n)
        num_images = np.where(kind < 0.4, 0, np.where(kind < 0.9, 1, 2))
        text = rng.integers(30, 400, n)
        heights, widths = rng.integers(10, 25, (n, 2)) * 2, rng.integers(7, 20, (n, 2)) * 2
        image_tokens = (heights * widths // 4 * (np.arange(2) < num_images[:, None])).sum(axis=1)
        tokens = np.minimum(text + image_tokens, MAX_TOKENS).tolist()
        sizes = rng.integers(30_000, 400_000, n)
        offsets = (np.cumsum(sizes) - sizes).tolist()
        answers = rng.integers(2, 64, n).tolist()
        grids = [
            [[1, h, w] for h, w in zip(hs[:k], ws[:k], strict=True)]
            for hs, ws, k in zip(heights.tolist(), widths.tolist(), num_images.tolist(), strict=True)
        ]
        samples = [
            {"key": f"train-{lo + i:09d}", "offset": offsets[i], "num_bytes": size, "num_tokens": tokens[i],
             "num_answer_tokens": answers[i], "num_images": len(grids[i]), "image_grid_thw": grids[i]}
            for i, size in enumerate(sizes.tolist())
        ]  # fmt: skip
        yield {"name": f"shard-{shard_id:06d}.tar", "num_bytes": int(sizes.sum()) + 1024, "sha256": "0" * 64,
               "samples": samples}  # fmt: skip


def write_set(directory: Path, num_samples: int) -> float:
    """Write the synthetic index with the project's writer; returns the seconds it took."""
    from data_tools.index import make_index, write_index

    start = time.perf_counter()
    tokenizer = {"fingerprint": "bench", "name_or_path": "bench", "mask_token_id": None}
    index, table = make_index(shard_entries(num_samples), tokenizer, {"source": "benchmarks/index_scale.py"})
    write_index(directory, index, table)
    return time.perf_counter() - start


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (`VmRSS`, `VmHWM`: the peak RSS of
    this program; unlike `ru_maxrss` it does not carry the parent's peak over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def private_dirty_mib() -> float:
    """Memory this process wrote and shares with no one: its own allocations and the pages it copied
    on write from the parent. (File pages it was first to read are `Private_Clean`: page cache.)"""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    raise KeyError("Private_Dirty")


def _worker(catalog: Any, plan: Any, queue: Any) -> None:
    """What a loader worker does before reading tars: the sample refs of its rank's steps."""
    at_start = private_dirty_mib()
    refs = [
        catalog.ref(i)
        for step in range(min(200, plan.num_steps))
        for p in plan.rank_packs(step, 0, 8)
        for i in p
    ]
    queue.put({"refs": len(refs), "private_dirty_mib": private_dirty_mib(), "at_start_mib": at_start})


def measure(directory: str) -> dict[str, float]:
    """One rank's start-up on `directory` (run in a fresh process)."""
    from trainer.data import Planner, PlanSpec, load_catalog

    before = status_mib("VmRSS")  # the interpreter, torch and numpy
    start = time.perf_counter()
    catalog = load_catalog([directory])
    load_s = time.perf_counter() - start
    load_rss = status_mib("VmHWM") - before
    start, cpu_start = time.perf_counter(), time.process_time()
    plan = Planner(
        catalog, PlanSpec(weights=(1.0,), seed=0, max_tokens=MAX_TOKENS, packs_per_step=PACKS_PER_STEP)
    ).plan(0)
    plan_s, plan_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    plan_rss = status_mib("VmHWM") - before
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_worker, args=(catalog, plan, queue))
    child.start()
    worker = queue.get()
    child.join()
    return {
        "samples": len(catalog),
        "load_s": load_s,
        "imports_rss_mib": before,
        "load_peak_rss_mib": load_rss,
        "plan_s": plan_s,
        "plan_cpu_s": plan_cpu_s,
        "peak_rss_after_plan_mib": plan_rss,
        "packs": len(plan.packs),
        "packing_efficiency": plan.packing_efficiency,
        "worker_private_dirty_mib": worker["private_dirty_mib"],
        "worker_private_dirty_at_start_mib": worker["at_start_mib"],
        "worker_refs": worker["refs"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, nargs="+", default=[2_000_000, 10_000_000])
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    rows = []
    for n in args.samples:
        with tempfile.TemporaryDirectory() as tmp:
            write_s = write_set(Path(tmp), n)
            files = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
            out = subprocess.run(
                [sys.executable, __file__, "--measure", tmp], check=True, capture_output=True, text=True
            ).stdout
            row = {**json.loads(out.splitlines()[-1]), "write_s": write_s, "index_mib": files / 2**20}
        rows.append(row)
        print(
            f"{n:>11,} samples: index {row['index_mib']:.0f} MiB written in {row['write_s']:.1f} s | "
            f"load_catalog {row['load_s']:.2f} s, +{row['load_peak_rss_mib']:.0f} MiB peak RSS | "
            f"epoch plan {row['plan_s']:.2f} s ({row['plan_cpu_s']:.2f} s CPU; {row['packs']:,} packs, efficiency "
            f"{row['packing_efficiency']:.3f}), +{row['peak_rss_after_plan_mib']:.0f} MiB peak RSS | "
            f"worker private-dirty {row['worker_private_dirty_at_start_mib']:.0f} MiB at start, "
            f"{row['worker_private_dirty_mib']:.0f} MiB after {row['worker_refs']:,} "
            f"refs (RSS above the {row['imports_rss_mib']:.0f} MiB of the imports)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
