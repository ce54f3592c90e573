"""`TrainLoader` (one item per global step, exact resume) and `EvalLoader` (fixed order, every sample once).

Workers split a rank's steps round-robin (worker w of n builds steps w, w+n, ...) and the main
process re-orders what comes back by step number, so a rank sees the same batches in the same order
whatever `num_workers` is. Workers only read and collate; all decisions come from the plan.

Workers ignore SIGTERM and SIGINT. A scheduler signals the whole job (scancel, Kubernetes, a
launcher's `killpg`, Ctrl-C's process group): a worker that died of it would end the rank with
"DataLoader worker ... is killed by signal" before the rank could commit its checkpoint. The rank
decides when to stop (trainer.run.stopping) and ends its workers by closing the loader; torch's watchdog
ends them if the rank dies.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.batch import PackedBatch, SampleReader, collate_rows
from trainer.data.plan import (
    Catalog,
    EpochPlan,
    Packs,
    Planner,
    PlanSpec,
    SampleRef,
    best_fit_pack,
    load_catalog,
)

__all__ = ["EvalLoader", "TrainLoader", "TrainStep"]

logger = logging.getLogger(__name__)

# step -> micro-batch -> row -> samples to read
_Row = list[tuple[SampleRef, str]]
_Step = list[list[_Row]]


@dataclass
class TrainStep:
    """What one rank trains on in one global step."""

    epoch: int
    """Epoch of the step."""
    step: int
    """Global step index inside the epoch."""
    micro_batches: list[PackedBatch]
    """grad_accum micro-batches of micro_batch rows each."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples of this step skipped on this rank, by reason ("corrupt", "mismatch", "token_out_of_range")."""
    skipped_where: dict[str, int] = field(default_factory=dict)
    """The same skips by "REASON SHARD"."""
    num_read: int = 0
    """Samples of this step this rank tried to read."""

    @property
    def keys(self) -> list[str]:
        """All sample keys of this rank's step, in row order."""
        return [k for mb in self.micro_batches for row in mb.keys for k in row]

    def pin_memory(self) -> TrainStep:
        """A copy whose tensors are in pinned memory (DataLoader(pin_memory=True))."""
        pinned = [mb.pin_memory() for mb in self.micro_batches]
        return TrainStep(self.epoch, self.step, pinned, self.skipped, self.skipped_where, self.num_read)


def _identity(item: TrainStep) -> TrainStep:
    return item


class _RankSteps(IterableDataset):
    """The steps of one rank; worker w of n produces steps w, w+n, w+2n, ... (re-ordered by the caller)."""

    def __init__(self, steps: Sequence[_Step], epoch: int, first_step: int, reader: SampleReader) -> None:
        super().__init__()
        self.steps = steps
        self.epoch = epoch
        self.first_step = first_step
        self.reader = reader

    def __iter__(self) -> Iterator[TrainStep]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in range(worker, len(self.steps), num_workers):
            before, before_where, read_before = (
                Counter(self.reader.skipped),
                Counter(self.reader.skipped_where),
                self.reader.num_read,
            )
            micro_batches = []
            for rows in self.steps[j]:
                loaded = [
                    [s for s in (self.reader.read(ref, key) for ref, key in row) if s is not None]
                    for row in rows
                ]
                micro_batches.append(collate_rows(loaded, self.reader.pad_token_id))
            skipped = dict(self.reader.skipped - before)
            where = dict(self.reader.skipped_where - before_where)
            num_read = self.reader.num_read - read_before
            yield TrainStep(self.epoch, self.first_step + j, micro_batches, skipped, where, num_read)


def usable_cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def _note_worker_clamp(requested: int, usable: int) -> None:
    """Say once per process (not once per epoch) that fewer workers run than configured."""
    logger.warning(
        "data.num_workers %d clamped to %d, the number of CPU cores this process may use", requested, usable
    )


def _worker_count(requested: int, num_steps: int) -> int:
    """`requested` workers, at most one per usable core (more only compete for the same cores) and per step."""
    usable = usable_cpu_count()
    if requested > usable:
        _note_worker_clamp(requested, usable)
    return min(requested, usable, max(1, num_steps))


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: leave stopping to the rank (see the module docstring), then take the
    signals held over the fork, which are now ignored."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while the workers are forked: a forked worker inherits the held mask, so
    a signal sent before its ``_ignore_stop_signals`` ran waits and is then ignored, never kills it.
    The rank receives a held signal (its own handler runs) as soon as this block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ordered_steps(
    steps: Sequence[_Step],
    epoch: int,
    first_step: int,
    reader: SampleReader,
    num_workers: int,
    prefetch_factor: int,
    pin_memory: bool,
) -> Iterator[TrainStep]:
    """Yield the steps in order, built by `num_workers` background processes (0: in this process)."""
    dataset = _RankSteps(steps, epoch, first_step, reader)
    if num_workers == 0:
        yield from dataset
        return
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=_worker_count(num_workers, len(steps)),
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        collate_fn=_identity,
        worker_init_fn=_ignore_stop_signals,
    )
    with _stop_signals_held():
        items = iter(loader)  # forks the workers
    pending: dict[int, TrainStep] = {}
    expected = first_step
    for item in items:
        # The DataLoader already alternates workers in order; the buffer makes the order a guarantee.
        pending[item.step] = item
        while expected in pending:
            yield pending.pop(expected)
            expected += 1
    if pending:
        raise RuntimeError(f"data workers skipped steps before {sorted(pending)} (expected step {expected})")


def _rows(catalog: Catalog, packs: Sequence[tuple[int, ...]]) -> list[_Row]:
    return [[(catalog.ref(i), catalog.display_key(i)) for i in pack] for pack in packs]


class _PlanSteps(Sequence[_Step]):
    """A rank's steps of one epoch, from `first_step` on, each made when asked for: a worker builds
    the sample refs of its own steps only, never of the whole epoch."""

    def __init__(self, loader: TrainLoader, plan: EpochPlan, first_step: int) -> None:
        self.catalog, self.plan, self.first_step = loader.catalog, plan, first_step
        self.rank, self.world_size = loader.rank, loader.world_size
        self.micro_batch, self.grad_accum = loader.micro_batch, loader.grad_accum

    def __len__(self) -> int:
        return self.plan.num_steps - self.first_step

    def __getitem__(self, j: int) -> _Step:  # type: ignore[override]
        packs = self.plan.rank_packs(self.first_step + j, self.rank, self.world_size)
        rows = _rows(self.catalog, packs)
        return [rows[m * self.micro_batch : (m + 1) * self.micro_batch] for m in range(self.grad_accum)]


class TrainLoader:
    """Streams a rank's global steps from the epoch plan; iterating yields one `TrainStep` per step.

    Iteration starts at `(start_epoch, start_step)` (or `resume`, a `state()` dict) and runs through
    the epochs until `max_epochs` (None: forever; the loop decides when to stop). `state()` is the
    position of the next step, so a checkpoint taken after training a yielded step resumes with the
    step after it: the batches are exactly those the uninterrupted run would have produced, with any
    `num_workers`, and at any world size with the same global batch (`micro_batch * grad_accum *
    world_size` packs; see `trainer.data.plan` for how a step's packs are divided among ranks).
    """

    def __init__(
        self,
        shard_dirs: Sequence[str | Path],
        weights: Sequence[float] | None = None,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        grad_accum: int,
        max_tokens: int,
        seed: int,
        processor: Any,
        drop_remainder: bool = False,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        window: int = 64,
        packing: bool = True,
        limit: int = 0,
        start_epoch: int = 0,
        start_step: int = 0,
        resume: Mapping[str, Any] | None = None,
        allow_plan_change: bool = False,
        max_epochs: int | None = None,
    ) -> None:
        """See the class docstring; `processor` is a Qwen3-VL processor (`trainer.model.processor.load_processor`),
        `weights` one mixing weight per shard set (default 1 each), `limit` keeps the first N samples of
        each set, `window` is the best-fit window and `packing=False` puts one sample per row;
        `allow_plan_change` resumes a `resume` position taken under another plan (the resume rule's
        ``checkpoint.allow_config_change``) instead of refusing it."""
        for name, value in (
            ("world_size", world_size),
            ("micro_batch", micro_batch),
            ("grad_accum", grad_accum),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.catalog = load_catalog(shard_dirs, limit)
        self.spec = PlanSpec.of_steps(
            (1.0,) * len(self.catalog.directories) if weights is None else weights,
            seed=seed,
            max_tokens=max_tokens,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            world_size=world_size,
            drop_remainder=drop_remainder,
            window=window,
            packing=packing,
        )
        self.planner = Planner(self.catalog, self.spec)
        self.reader = SampleReader(processor)
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_epochs = max_epochs
        self.plan_fingerprint = self.spec.fingerprint(self.catalog)
        self.num_skipped_where: Counter[str] = Counter()
        """Skipped samples on this rank by "REASON SHARD"."""
        self.num_skipped: Counter[str] = Counter()
        """Skipped samples on this rank so far, by reason (reduce across ranks before reporting)."""
        if resume is not None:
            if resume.get("plan_fingerprint") not in (None, self.plan_fingerprint) and not allow_plan_change:
                raise ValueError(
                    "the data plan changed since the checkpoint (shards, weights, seed, max_tokens, packing, "
                    "limit or global batch): a resume keeps what the run computes unless "
                    "checkpoint.allow_config_change (RESUME_DEFINING_KEYS, trainer/config/validate.py); "
                    "resume with the same data, pass --allow_config_change, or start a new run"
                )
            start_epoch, start_step = int(resume["epoch"]), int(resume["step"])
        if start_epoch < 0 or start_step < 0:
            raise ValueError(f"start position (epoch {start_epoch}, step {start_step}) must be >= 0")
        num_steps = self.planner.plan(start_epoch).num_steps
        if start_step > num_steps:
            raise ValueError(f"start step {start_step} is past the {num_steps} steps of epoch {start_epoch}")
        self._epoch, self._step = start_epoch, start_step
        self._normalise()

    @property
    def steps_per_epoch(self) -> int:
        """Global steps in the current epoch (may differ by one between epochs when remainders carry)."""
        return self.num_steps(self._epoch)

    def num_steps(self, epoch: int) -> int:
        """Global steps in `epoch`."""
        return self.planner.plan(epoch).num_steps

    def plan(self, epoch: int) -> EpochPlan:
        """The global plan of `epoch`."""
        return self.planner.plan(epoch)

    def state(self) -> dict[str, Any]:
        """Position of the next step to produce: `{"epoch", "step", "plan_fingerprint"}` (JSON-able)."""
        return {"epoch": self._epoch, "step": self._step, "plan_fingerprint": self.plan_fingerprint}

    def __iter__(self) -> Iterator[TrainStep]:
        while self.max_epochs is None or self._epoch < self.max_epochs:
            plan = self.planner.plan(self._epoch)
            steps = _PlanSteps(self, plan, self._step)
            for item in _ordered_steps(
                steps,
                plan.epoch,
                self._step,
                self.reader,
                self.num_workers,
                self.prefetch_factor,
                self.pin_memory,
            ):
                # Advance before yielding: state() taken after training this step points past it.
                self._step = item.step + 1
                self._normalise()
                self.num_skipped.update(item.skipped)
                self.num_skipped_where.update(item.skipped_where)
                yield item

    def _normalise(self) -> None:
        if self._step >= self.planner.plan(self._epoch).num_steps:
            self._epoch, self._step = self._epoch + 1, 0


class EvalLoader:
    """Held-out batches in a fixed order: every sample once, no shuffle, equal steps on every rank.

    Samples are packed in index order (best fit, like training) and the micro-batches dealt to
    ranks round-robin; ranks with fewer get padding batches (one dummy row, keys `[]`, no answer
    tokens), so collective ops inside the forward never hang. The last real micro-batch may have
    fewer rows. Samples longer than `max_tokens` are excluded and counted in `num_too_long`.
    """

    def __init__(
        self,
        shard_dirs: Sequence[str | Path],
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        max_tokens: int,
        processor: Any,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        packing: bool = True,
        window: int = 64,
        limit: int = 0,
    ) -> None:
        """`processor`: a Qwen3-VL processor; `limit` keeps the first N samples of every set (0 = all)."""
        if not 0 <= rank < world_size or micro_batch < 1:
            raise ValueError(f"need 0 <= rank ({rank}) < world_size ({world_size}) and micro_batch >= 1")
        self.catalog = load_catalog(shard_dirs, limit)
        fits = np.flatnonzero(self.catalog.num_tokens <= max_tokens)
        self.num_too_long = len(self.catalog) - len(fits)
        if packing:
            packs = best_fit_pack(self.catalog.num_tokens[fits], max_tokens, window).take(fits)
        else:
            packs = Packs.singletons(fits)
        batches = [packs[i : i + micro_batch] for i in range(0, len(packs), micro_batch)]
        self.num_steps = math.ceil(len(batches) / world_size)
        mine = batches[rank::world_size]
        self._steps: list[_Step] = [[_rows(self.catalog, b)] for b in mine]
        self._steps += [[[[]]]] * (self.num_steps - len(mine))  # padding batches: one empty row
        self.reader = SampleReader(processor)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.num_skipped: Counter[str] = Counter()
        """Skipped samples on this rank, by reason."""

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[PackedBatch]:
        for item in _ordered_steps(
            self._steps, 0, 0, self.reader, self.num_workers, self.prefetch_factor, False
        ):
            self.num_skipped.update(item.skipped)
            yield item.micro_batches[0]
