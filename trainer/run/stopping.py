"""When a run stops early: signals, the time limit and ``schedule.exit_after_steps``, agreed by all ranks."""

from __future__ import annotations

import signal
import time
from typing import Any

from trainer.config import ScheduleConfig
from trainer.run import distributed


class StopSignal:
    """Remembers SIGTERM / SIGINT (e.g. Slurm before the time limit) until the loop agrees to stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopAgreement:
    """One decision per step, the same on every rank: stop now (and why) or go on.

    Reasons: a signal on any rank, ``schedule.time_limit_s`` of this launch, or
    ``schedule.exit_after_steps`` steps done in this launch. Used as a context manager, it holds the
    signal handlers for the duration of the loop.
    """

    def __init__(self, schedule: ScheduleConfig, start_step: int) -> None:
        self.schedule = schedule
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.signal = StopSignal()

    def __enter__(self) -> StopAgreement:
        self.signal.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.signal.restore()

    def check(self, step: int) -> str | None:
        """The agreed reason to stop after ``step`` ("signal", "time limit", ...), or None (a collective)."""
        s = self.schedule
        reasons = (
            self.signal.received is not None,
            bool(s.time_limit_s) and time.perf_counter() - self.start_time >= s.time_limit_s,
            bool(s.exit_after_steps) and step - self.start_step >= s.exit_after_steps,
        )
        agreed = distributed.agree_any(*reasons)
        for name, stop in zip(("signal", "time limit", "schedule.exit_after_steps"), agreed, strict=True):
            if stop:
                return name
        return None
