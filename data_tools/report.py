"""`verify` and `inspect`: check a shard set against its index; summarise it (table, histogram, plot)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from data_tools import shards
from data_tools.build import SplitResult, summary_table


def split_dirs(directory: Path) -> list[Path]:
    """`directory` itself when it holds a shard set, else its sub-folders that do (train/, test/, ...)."""
    if (directory / shards.INDEX_NAME).is_file() or any(directory.glob("shard-*.tar")):
        return [directory]
    subs = (
        sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if directory.is_dir()
        else []
    )
    return subs or [directory]


def result_from_index(directory: Path, index: dict[str, Any]) -> SplitResult:
    """A `SplitResult` (for the summary table) from an `index.json`."""
    lengths = [s["num_tokens"] for sh in index["shards"] for s in sh["samples"]]
    return SplitResult(
        name=directory.name,
        directory=directory,
        num_samples=index["num_samples"],
        num_images=index["num_images"],
        token_lengths=lengths,
        rejects=Counter(index.get("rejects", {})),
        num_shards=len(index["shards"]),
        num_bytes=sum(sh["num_bytes"] for sh in index["shards"]),
    )


def histogram(values: list[int], num_bins: int = 12, width: int = 40) -> str:
    """A text histogram of `values` (token lengths)."""
    if not values:
        return "(no samples)"
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // num_bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        n = counts.get(b, 0)
        start = lo + b * step
        lines.append(f"{start:>7}-{start + step - 1:<7} {n:>7} {'#' * round(width * n / top)}")
    return "\n".join(lines)


def plot(results: list[SplitResult], path: str) -> None:
    """Token-length histograms of every split, as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.hist(r.token_lengths, bins=40, alpha=0.6, label=f"{r.name} ({r.num_samples} samples)")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """`python -m data_tools inspect DIR [--plot FILE.png]`."""
    parser = argparse.ArgumentParser(prog="python -m data_tools inspect", description="Summarise a shard set")
    parser.add_argument("directory", help="a shard set (or a folder of split shard sets)")
    parser.add_argument("--plot", default=None, help="write token-length histograms to this PNG")
    args = parser.parse_args(argv)
    results = []
    for d in split_dirs(Path(args.directory)):
        try:
            index = shards.read_index(d)
        except ValueError as e:
            raise SystemExit(str(e)) from e
        results.append(result_from_index(d, index))
    print(summary_table(results))
    for r in results:
        print(f"\n{r.name}: tokens per sample")
        print(histogram(r.token_lengths))
    if args.plot:
        plot(results, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


def verify_main(argv: list[str]) -> int:
    """`python -m data_tools verify DIR [--model PATH]`: exit 1 and list problems if any."""
    parser = argparse.ArgumentParser(prog="python -m data_tools verify", description="Check a shard set")
    parser.add_argument("directory", help="a shard set (or a folder of split shard sets)")
    parser.add_argument(
        "--model", default=None, help="also check the tokenizer fingerprint against this model"
    )
    parser.add_argument("--no-hashes", action="store_true", help="skip the sha256 of each shard")
    args = parser.parse_args(argv)
    expected = None
    if args.model:
        from data_tools.samples import load_tokenizer, tokenizer_fingerprint

        expected = tokenizer_fingerprint(load_tokenizer(args.model))
    num_problems = 0
    for d in split_dirs(Path(args.directory)):
        problems = shards.verify(d, expected_fingerprint=expected, check_hashes=not args.no_hashes)
        for p in problems:
            print(f"{d}: {p}", file=sys.stderr)
        num_problems += len(problems)
        if not problems:
            index = shards.read_index(d)
            print(f"{d}: ok ({index['num_samples']} samples, {len(index['shards'])} shards)")
    return 1 if num_problems else 0
