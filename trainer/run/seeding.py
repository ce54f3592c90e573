"""Seeds derived from integers, the same in every process (Python's ``hash()`` is salted per process)."""

from __future__ import annotations

import zlib

import numpy as np


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, step, micro-batch index, purpose tag)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, sample key): the fixed evaluation masks of a sample (trainer.run.nelbo)."""
    return (zlib.crc32(f"{seed}:{key}".encode()) << 31) ^ zlib.crc32(f"{key}:{seed}".encode())
