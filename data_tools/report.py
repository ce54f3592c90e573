"""Reports on shard sets: the summary of a build (`SplitResult`, the table), and the `verify` and
`inspect` commands (check a shard set against its index; table, token-length histogram, plot).

(Named `report`, not `inspect`, so that it does not shadow the standard library's `inspect`.)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools import shards
from data_tools.errors import BuildError
from data_tools.index import INDEX_NAME, INDEX_VERSION, read_index, read_table, upgrade_index


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


def result_from_index(name: str, directory: Path, index: dict[str, Any]) -> SplitResult:
    """A `SplitResult` (for the summary table) from the `index.json` of a complete split."""
    return SplitResult(
        name=name,
        directory=directory,
        num_samples=index["num_samples"],
        num_images=index["num_images"],
        token_lengths=read_table(directory, index).num_tokens.tolist(),
        rejects=Counter(index.get("rejects", {})),
        num_shards=len(index["shards"]),
        num_bytes=sum(sh["num_bytes"] for sh in index["shards"]),
    )


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


def split_dirs(directory: Path) -> list[Path]:
    """`directory` itself when it holds a shard set, else its sub-folders that do (train/, test/, ...)."""
    if (directory / INDEX_NAME).is_file() or any(directory.glob("shard-*.tar")):
        return [directory]
    subs = (
        sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if directory.is_dir()
        else []
    )
    return subs or [directory]


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
            index = read_index(d)
        except ValueError as e:  # a missing or foreign index.json: the user's input, not a bug
            raise BuildError(str(e)) from e
        results.append(result_from_index(d.name, d, index))
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
            index = read_index(d)
            print(f"{d}: ok ({index['num_samples']} samples, {len(index['shards'])} shards)")
    return 1 if num_problems else 0


def upgrade_main(argv: list[str]) -> int:
    """`python -m data_tools upgrade-index DIR [DIR ...]`: upgrade older shard sets' indexes in place."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools upgrade-index",
        description="Rewrite the index.json of shard sets built by an older data_tools as this version's "
        "index (sample columns + summary), in place and atomically; the tars are not touched.",
    )
    parser.add_argument("directories", nargs="+", help="shard sets (or folders of split shard sets)")
    args = parser.parse_args(argv)
    for top in args.directories:
        for directory in split_dirs(Path(top)):
            try:
                upgraded = upgrade_index(directory)
            except ValueError as e:  # a missing or foreign index.json: the message names the fix
                raise BuildError(str(e)) from e
            print(f"{directory}: {'upgraded to' if upgraded else 'already at'} index version {INDEX_VERSION}")
    return 0
