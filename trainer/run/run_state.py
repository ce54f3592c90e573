"""The run state: what a resumed run continues from, saved with every checkpoint and restored as one value.

The data position is the loader's own value (``TrainLoader.state()``, saved beside it); the noise of a
step is derived from the seed and the step, so no RNG state is kept. Counts over samples are global
(all ranks), so a run resumed at another world size continues them: rank 0 takes the saved totals
back into its loader's counters and the other ranks start at zero (the metrics sum over ranks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    """Counters of the whole run (not of this launch), the same on every rank."""

    step: int = 0
    """Optimizer steps done."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite gradient norm."""
    consecutive_skips: int = 0
    """Skipped steps in a row up to ``step`` (``schedule.max_consecutive_skips`` ends the run)."""
    samples_read: int = 0
    """Training samples the loaders of all ranks read (the denominator of ``data.max_skip_fraction``)."""
    samples_skipped: int = 0
    """Of those, samples skipped as unreadable or mismatched (its numerator)."""
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    """All ranks' skipped training samples by reason (the ``skipped_samples`` metric)."""
    skipped_where: dict[str, int] = field(default_factory=dict)
    """All ranks' skipped training samples by ``"reason shard"`` (the skip-budget error's table)."""

    def to_state(self) -> dict[str, Any]:
        """The JSON-ready value saved in a checkpoint's trainer state."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RunState:
        """The run state of a checkpoint's trainer state (a field it predates takes its default)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
