"""Epoch plans computed from `index.json` alone: mixing, permutation, packing, global steps.

Every rank builds the same plan from the same inputs (shard sets, weights, seed, epoch, max_tokens,
packs per global step) without reading a tar, so every rank knows every step in advance: no rank can
run out early, and a resume position is just `(epoch, step)`.

Definitions (the contract the loader and its tests rely on):
- The *sample list* of epoch e: for every shard set i, `round(weight_i * N_i)` samples taken from an
  endless stream of per-cycle permutations of that set (weight 1: every sample once; 0.5: half the
  set, the other half next epoch; 2: every sample twice), all shuffled together. Samples longer
  than `max_tokens` are excluded up front and counted.
- The *packs* of epoch e: the sample list cut into packs of at most `max_tokens` tokens by a
  bounded-window best-fit (at most `window` packs open at once; a sample goes into the open pack
  it fills best, else a new pack; when too many are open, the fullest is closed).
- The *pack stream* of epoch e: the packs carried over from epoch e-1, then epoch e's own packs.
- A *global step* takes the next `packs_per_step = micro_batch * grad_accum * world_size` packs of
  the stream. The packs of a global step depend only on `packs_per_step`, never on how it factors
  into ranks, so a run may resume at another world size with the same global batch. Rank r trains
  on packs `[r * B * G, (r + 1) * B * G)` of the step, micro-batch m on the B rows after `m * B`.
- The *remainder* (fewer than `packs_per_step` packs left at the end of the stream) is carried into
  the next epoch's stream (default) or dropped (`drop_remainder`). The remainder of the last epoch
  trained is never seen.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from data_tools.index import SampleTable, read_index, read_table
from trainer.config.validate import parse_shard_spec, parse_shard_specs

if TYPE_CHECKING:
    from trainer.config import TrainConfig

__all__ = [
    "Catalog",
    "EpochPlan",
    "Packs",
    "PlanSpec",
    "Planner",
    "SampleRef",
    "best_fit_pack",
    "load_catalog",
    "parse_shard_spec",
    "parse_shard_specs",
    "plan_args",
]

# Seed-sequence tags keep the random streams of different purposes independent.
_TAG_SET_CYCLE = 1
_TAG_EPOCH_MIX = 2


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives and what the index says about it (enough to read and check it)."""

    key: str
    """The sample key inside its shard set."""
    shard_path: str
    """Path of the tar holding the sample."""
    offset: int
    """Byte offset of the sample's first tar header."""
    num_bytes: int
    """Bytes spanned by all the sample's members."""
    num_tokens: int
    """len(input_ids)."""
    image_grid_thw: tuple[tuple[int, int, int], ...]
    """Grids of its images (in 16-px patches)."""


@dataclass
class Catalog:
    """All samples of one or more shard sets, numbered 0..N-1 in (set, shard, index) order.

    Per-sample fields stay in the sets' memory-mapped sample tables (`data_tools.index`); a
    `SampleRef` is made only for a sample about to be read."""

    directories: list[Path]
    """The shard set directories, in the order given."""
    tables: list[SampleTable]
    """The sample table of every set (memory-mapped)."""
    shard_paths: list[list[str]]
    """Per set, the path of every shard in index order."""
    set_start: np.ndarray
    """[K+1] int64: the samples of set k are catalog ids set_start[k]:set_start[k+1]."""
    num_tokens: np.ndarray
    """[N] token length of every sample."""
    fingerprints: list[str | None] = field(default_factory=list)
    """Tokenizer fingerprint of every set (all equal; checked on load)."""

    def __len__(self) -> int:
        return int(self.set_start[-1])

    def set_of(self, sample_id: int) -> int:
        """The shard set holding catalog sample `sample_id`."""
        return int(np.searchsorted(self.set_start, sample_id, side="right")) - 1

    def ref(self, sample_id: int) -> SampleRef:
        """Where sample `sample_id` lives and what the index says about it."""
        set_index = self.set_of(sample_id)
        table, i = self.tables[set_index], sample_id - int(self.set_start[set_index])
        return SampleRef(
            table.key_of(i),
            self.shard_paths[set_index][table.shard_of(i)],
            int(table.offset[i]),
            int(table.num_bytes[i]),
            int(table.num_tokens[i]),
            table.grids(i),
        )

    def display_key(self, sample_id: int) -> str:
        """The key used in plans and batches: the sample key, prefixed by `SET:` with several sets."""
        set_index = self.set_of(sample_id)
        key = self.tables[set_index].key_of(sample_id - int(self.set_start[set_index]))
        return key if len(self.directories) == 1 else f"{set_index}:{key}"


def load_catalog(shard_dirs: Sequence[str | Path], limit: int = 0) -> Catalog:
    """Open the index of every shard set (no tar is opened; the sample columns are memory-mapped).

    Args:
        shard_dirs: shard set directories (each with `index.json`).
        limit: keep only the first `limit` samples of every set, in index order (0 = all).

    Raises:
        ValueError: a missing/invalid index, or sets built with different tokenizers.
    """
    if not shard_dirs:
        raise ValueError("no shard set given: pass at least one directory holding index.json")
    directories = [Path(d) for d in shard_dirs]
    tables: list[SampleTable] = []
    shard_paths: list[list[str]] = []
    fingerprints: list[str | None] = []
    sizes: list[int] = []
    for directory in directories:
        index = read_index(directory)
        fingerprints.append(index.get("tokenizer", {}).get("fingerprint"))
        table = read_table(directory, index)
        size = min(len(table), limit) if limit else len(table)
        if size == 0:
            raise ValueError(f"{directory}/index.json lists no samples: rebuild the shard set or drop it")
        tables.append(table)
        shard_paths.append([str(directory / shard["name"]) for shard in index["shards"]])
        sizes.append(size)
    known = {f for f in fingerprints if f is not None}
    if len(known) > 1:
        raise ValueError(
            f"shard sets {[str(d) for d in directories]} were built with different tokenizers "
            "(index.json tokenizer.fingerprint differs): rebuild them with one tokenizer"
        )
    set_start = np.zeros(len(sizes) + 1, dtype=np.int64)
    set_start[1:] = np.cumsum(sizes)
    # One set read whole keeps its mapped column as is; otherwise the (small) token column is copied.
    parts = [table.num_tokens[:size] for table, size in zip(tables, sizes, strict=True)]
    num_tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return Catalog(directories, tables, shard_paths, set_start, num_tokens, fingerprints)


class Packs(Sequence[tuple[int, ...]]):
    """A sequence of packs stored flat: pack k holds the ids `ids[bounds[k]:bounds[k+1]]` (a list of
    tuples would be one Python object per sample: ten million of them at scale)."""

    def __init__(self, ids: np.ndarray, bounds: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.bounds = np.asarray(bounds, dtype=np.int64)

    @classmethod
    def singletons(cls, ids: np.ndarray) -> Packs:
        """One id per pack."""
        return cls(ids, np.arange(len(ids) + 1))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @overload
    def __getitem__(self, k: int) -> tuple[int, ...]: ...
    @overload
    def __getitem__(self, k: slice) -> Packs: ...
    def __getitem__(self, k: int | slice) -> tuple[int, ...] | Packs:
        if isinstance(k, slice):
            start, stop, stride = k.indices(len(self))
            if stride != 1:
                raise ValueError("packs can only be sliced contiguously")
            stop = max(start, stop)
            lo, hi = self.bounds[start], self.bounds[stop]
            return Packs(self.ids[lo:hi], self.bounds[start : stop + 1] - lo)
        if not -len(self) <= k < len(self):
            raise IndexError(f"pack {k} of {len(self)}")
        k %= len(self)
        return tuple(self.ids[self.bounds[k] : self.bounds[k + 1]].tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Packs):
            return np.array_equal(self.bounds, other.bounds) and np.array_equal(self.ids, other.ids)
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(tuple(a) == b for a, b in zip(other, self, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __add__(self, other: Packs) -> Packs:
        return Packs(
            np.concatenate([self.ids, other.ids]),
            np.concatenate([self.bounds[:-1], other.bounds + len(self.ids)]),
        )

    def take(self, ids: np.ndarray) -> Packs:
        """The same pack shapes over `ids[self.ids]` (positions mapped to ids)."""
        return Packs(np.asarray(ids)[self.ids], self.bounds)


# Items are read from numpy in chunks of this many: a Python list of all ten million lengths
# (and of their bins) would hold ~700 MB of int objects.
_PACK_CHUNK = 1 << 16
_BIN_ID_BITS = 40


def best_fit_pack(lengths: Sequence[int] | np.ndarray, max_tokens: int, window: int) -> Packs:
    """Pack items (in the given order) into bins of at most `max_tokens`; returns bins of item positions.

    Bounded-window best fit: at most `window` bins are open; an item goes into the open bin with the
    least room that still fits it (oldest on ties), else into a new bin; a bin is closed when full,
    or, when more than `window` are open, the fullest open bin is closed. Bins come out in closing
    order, the ones still open at the end in opening order. Deterministic; O(n * window) worst case.
    """
    if window < 1:
        raise ValueError(f"packing window must be >= 1, got {window}")
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_tokens)
    if len(too_long):
        raise ValueError(f"item {too_long[0]} has {lengths[too_long[0]]} tokens > max_tokens {max_tokens}")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    # An open bin is one int, room << 40 | bin id: sorted ints order by room, then by age, and ints
    # compare far faster than (room, id) tuples in this loop (ten million items at scale).
    open_bins: list[int] = []
    closing: list[int] = []  # bin ids in closing order
    next_bin = 0
    bisect_left, insort, id_mask = bisect.bisect_left, bisect.insort, (1 << _BIN_ID_BITS) - 1
    for lo in range(0, len(lengths), _PACK_CHUNK):
        chunk_bins: list[int] = []
        add = chunk_bins.append
        for n in lengths[lo : lo + _PACK_CHUNK].tolist():
            i = bisect_left(open_bins, n << _BIN_ID_BITS)
            if i < len(open_bins):
                code = open_bins.pop(i)
                room, bin_id = code >> _BIN_ID_BITS, code & id_mask
            else:
                room, bin_id = max_tokens, next_bin
                next_bin += 1
            add(bin_id)
            room -= n
            if room == 0:
                closing.append(bin_id)
                continue
            insort(open_bins, room << _BIN_ID_BITS | bin_id)
            if len(open_bins) > window:
                closing.append(open_bins.pop(0) & id_mask)
        bin_of[lo : lo + len(chunk_bins)] = chunk_bins
    closing.extend(sorted(code & id_mask for code in open_bins))
    # Group items by their bin's closing rank; a stable sort keeps item order inside a bin.
    rank = np.empty(next_bin, dtype=np.int64)
    rank[np.asarray(closing, dtype=np.int64)] = np.arange(next_bin)
    item_rank = rank[bin_of]
    bounds = np.zeros(next_bin + 1, dtype=np.int64)
    bounds[1:] = np.cumsum(np.bincount(item_rank, minlength=next_bin))
    return Packs(np.argsort(item_rank, kind="stable"), bounds)


@dataclass(frozen=True)
class PlanSpec:
    """The inputs of an epoch plan besides the catalog (all ranks must agree on them)."""

    weights: tuple[float, ...]
    """Per shard set: samples drawn per epoch as a multiple of its size."""
    seed: int
    """Seed of the permutations."""
    max_tokens: int
    """Tokens per pack (row)."""
    packs_per_step: int
    """Packs in one global step = micro_batch * grad_accum * world_size."""
    drop_remainder: bool = False
    """Drop the packs that do not fill the last global step of an epoch, instead of carrying them."""
    window: int = 64
    """Open packs in the best-fit window (larger packs tighter, at more CPU)."""
    packing: bool = True
    """False: one sample per pack (no packing)."""

    @classmethod
    def of_steps(
        cls,
        weights: Sequence[float],
        *,
        seed: int,
        max_tokens: int,
        micro_batch: int,
        grad_accum: int,
        world_size: int,
        drop_remainder: bool = False,
        window: int = 64,
        packing: bool = True,
    ) -> PlanSpec:
        """The spec of global steps of ``micro_batch * grad_accum * world_size`` packs: the one
        constructor of `TrainLoader`, :meth:`from_config` and ``plan --shards``."""
        return cls(
            weights=tuple(float(w) for w in weights),
            seed=seed,
            max_tokens=max_tokens,
            packs_per_step=micro_batch * grad_accum * world_size,
            drop_remainder=drop_remainder,
            window=window,
            packing=packing,
        )

    @classmethod
    def from_config(cls, config: TrainConfig, world_size: int) -> PlanSpec:
        """The spec a run's loaders plan with (the loop passes :func:`plan_args` to `TrainLoader`, the
        dry run and the ``plan`` command take this): the planned run is the trained one by construction."""
        return cls.of_steps(**plan_args(config), world_size=world_size)

    def fingerprint(self, catalog: Catalog) -> str:
        """A short hash of everything that determines the plan (for resume checks)."""
        blob = json.dumps(
            {
                "spec": [list(self.weights), self.seed, self.max_tokens, self.packs_per_step],
                "options": [self.drop_remainder, self.window, self.packing],
                "sets": [str(d.resolve()) for d in catalog.directories],
                "samples": len(catalog),
                "tokens": int(catalog.num_tokens.sum(dtype=np.int64)),
            }
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_args(config: TrainConfig) -> dict[str, Any]:
    """The settings of a run that decide its plan besides the world size, as `TrainLoader` (and
    :meth:`PlanSpec.of_steps`) take them: mixing weights, seed, tokens per row, batch split, options."""
    return {
        "weights": parse_shard_specs(config.data.train, "data.train")[1],
        "seed": config.seed,
        "max_tokens": config.data.max_tokens,
        "micro_batch": config.schedule.micro_batch_size,
        "grad_accum": config.schedule.grad_accum_steps,
        "drop_remainder": config.data.drop_remainder,
        "packing": config.data.packing,
    }


@dataclass
class EpochPlan:
    """The global plan of one epoch (identical on every rank)."""

    epoch: int
    """Epoch number."""
    packs: Packs
    """The pack stream: carried-in packs, then this epoch's own packs (of catalog sample ids)."""
    num_steps: int
    """Global steps in this epoch."""
    packs_per_step: int
    """Packs per global step."""
    num_carried_in: int
    """Packs at the head of `packs` that came from the previous epoch."""
    num_samples: int
    """Samples in this epoch's own sample list."""
    num_tokens: int
    """Tokens in this epoch's own packs."""
    num_too_long: int
    """Samples excluded because they exceed max_tokens (per epoch, of the catalog)."""
    drop_remainder: bool
    """Whether the tail is dropped (else carried)."""
    max_tokens: int
    """Tokens per pack."""

    @property
    def num_own_packs(self) -> int:
        """Packs built from this epoch's sample list."""
        return len(self.packs) - self.num_carried_in

    @property
    def remainder(self) -> Packs:
        """Packs after the last full step: carried to the next epoch, or dropped."""
        return self.packs[self.num_steps * self.packs_per_step :]

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (own packs * max_tokens)."""
        return self.num_tokens / max(1, self.num_own_packs * self.max_tokens)

    def step_packs(self, step: int) -> Packs:
        """All packs of global step `step`."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside epoch {self.epoch} ({self.num_steps} steps)")
        return self.packs[step * self.packs_per_step : (step + 1) * self.packs_per_step]

    def rank_packs(self, step: int, rank: int, world_size: int) -> Packs:
        """The packs rank `rank` trains on in `step` (contiguous slice of the step, in order)."""
        if self.packs_per_step % world_size:
            raise ValueError(f"packs per step {self.packs_per_step} do not divide by world size {world_size}")
        per_rank = self.packs_per_step // world_size
        return self.step_packs(step)[rank * per_rank : (rank + 1) * per_rank]


_NO_PACKS = Packs(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))


class Planner:
    """Computes (and caches) epoch plans; the same inputs give the same plan on every rank."""

    def __init__(self, catalog: Catalog, spec: PlanSpec) -> None:
        if len(spec.weights) != len(catalog.directories):
            raise ValueError(
                f"{len(spec.weights)} weights for {len(catalog.directories)} shard sets: give one per set"
            )
        if spec.max_tokens < 1 or spec.packs_per_step < 1:
            raise ValueError(
                "max_tokens and packs per step (micro_batch * grad_accum * world_size) must be >= 1"
            )
        self.catalog = catalog
        self.spec = spec
        fits = catalog.num_tokens <= spec.max_tokens
        self.num_too_long = int((~fits).sum())
        # Eligible samples of every set, in catalog order.
        bounds = catalog.set_start.tolist()
        self._eligible = [lo + np.flatnonzero(fits[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
        self._cache: dict[int, EpochPlan] = {}

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """The shuffled sample ids of `epoch` (before packing; see the module docstring)."""
        parts = []
        for set_index, (eligible, weight) in enumerate(zip(self._eligible, self.spec.weights, strict=True)):
            n = len(eligible)
            count = round(weight * n)
            if n == 0 or count == 0:
                continue
            begin = epoch * count
            chunks = []
            for cycle in range(begin // n, (begin + count - 1) // n + 1):
                perm = self._rng(_TAG_SET_CYCLE, set_index, cycle).permutation(n)
                lo, hi = max(begin, cycle * n) - cycle * n, min(begin + count, (cycle + 1) * n) - cycle * n
                chunks.append(eligible[perm[lo:hi]])
            parts.append(np.concatenate(chunks))
        if not parts:
            raise ValueError(
                f"no sample fits max_tokens {self.spec.max_tokens} with weights {list(self.spec.weights)}: "
                "raise max_tokens or rebuild the shards with shorter samples"
            )
        samples = np.concatenate(parts)
        return samples[self._rng(_TAG_EPOCH_MIX, epoch).permutation(len(samples))]

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch` (computes the earlier epochs too when remainders are carried)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch in self._cache:
            return self._cache[epoch]
        first = epoch
        if not self.spec.drop_remainder:
            # The carry chains epochs: start from the latest cached one below, else from epoch 0.
            first = max((e + 1 for e in self._cache if e < epoch), default=0)
        for e in range(first, epoch + 1):
            carried = _NO_PACKS if e == 0 or self.spec.drop_remainder else self._cache[e - 1].remainder
            self._cache[e] = self._build(e, carried)
            # Keep memory bounded: only the last two plans are needed for carrying and iteration.
            for old in [k for k in self._cache if k < e - 1]:
                del self._cache[old]
        return self._cache[epoch]

    def _build(self, epoch: int, carried: Packs) -> EpochPlan:
        samples = self.epoch_samples(epoch)
        lengths = self.catalog.num_tokens[samples]
        if self.spec.packing:
            own = best_fit_pack(lengths, self.spec.max_tokens, self.spec.window).take(samples)
        else:
            own = Packs.singletons(samples)
        if len(own) < self.spec.packs_per_step:
            raise ValueError(
                f"epoch {epoch} has {len(own)} packs, fewer than one global step of "
                f"{self.spec.packs_per_step} (micro_batch * grad_accum * world_size): use a smaller batch "
                "or more data"
            )
        packs = carried + own
        return EpochPlan(
            epoch=epoch,
            packs=packs,
            num_steps=len(packs) // self.spec.packs_per_step,
            packs_per_step=self.spec.packs_per_step,
            num_carried_in=len(carried),
            num_samples=len(samples),
            num_tokens=int(lengths.sum(dtype=np.int64)),
            num_too_long=self.num_too_long,
            drop_remainder=self.spec.drop_remainder,
            max_tokens=self.spec.max_tokens,
        )

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.spec.seed, *tags]))


def plan_summary(plan: EpochPlan, catalog: Catalog, world_size: int) -> dict[str, Any]:
    """The JSON form of a plan: `steps[s][r]` = packs (lists of keys) of rank r at global step s."""
    steps = [
        [
            [[catalog.display_key(i) for i in pack] for pack in plan.rank_packs(s, r, world_size)]
            for r in range(world_size)
        ]
        for s in range(plan.num_steps)
    ]
    return {
        "epoch": plan.epoch,
        "world_size": world_size,
        "packs_per_step": plan.packs_per_step,
        "num_steps": plan.num_steps,
        "steps": steps,
        "packing_efficiency": plan.packing_efficiency,
        "num_samples": plan.num_samples,
        "num_tokens": plan.num_tokens,
        "num_packs": plan.num_own_packs,
        "num_excluded_too_long": plan.num_too_long,
        "num_carried_in": plan.num_carried_in,
        "remainder": [[catalog.display_key(i) for i in pack] for pack in plan.remainder],
        "drop_remainder": plan.drop_remainder,
    }
