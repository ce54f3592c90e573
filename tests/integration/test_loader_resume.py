"""Resume in new processes: stop after k steps, restart from `state()`, get exactly the remaining batches.

Also at another world size with the same global batch (4 packs per step): the packs of every global
step are the same set. Run as a script, this file is the child process (one loader per rank).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve()
MAX_TOKENS = 80
LAYOUT = 2 * [
    [(5, []), (30, [(4, 4)]), (12, []), (60, []), (8, [(6, 4), (2, 2)]), (20, []), (3, [(2, 2)])],
    [(40, []), (15, [(4, 2)]), (25, []), (33, [])],
    [
        (10, []),
        (50, [(4, 4)]),
        (7, []),
        (35, []),
        (18, [(2, 4)]),
        (22, []),
        (9, []),
        (45, []),
        (4, []),
        (28, []),
    ],
]


def run_ranks(
    shards: str, model: str, world_size: int, micro_batch: int, grad_accum: int, num_workers: int,
    resume: dict[str, Any] | None, max_steps: int,
) -> dict[str, Any]:  # fmt: skip
    """Run every rank's loader for up to `max_steps` steps (2 epochs at most); keys and digests per step."""
    from trainer.data import TrainLoader
    from trainer.model.processor import load_processor

    processor = load_processor(model)
    steps: dict[str, dict[int, list[str]]] = {}
    digests: dict[str, dict[int, int]] = {}
    states = []
    for rank in range(world_size):
        loader = TrainLoader(
            [shards], rank=rank, world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum,
            max_tokens=MAX_TOKENS, seed=11, processor=processor, num_workers=num_workers, resume=resume,
            max_epochs=2,
        )  # fmt: skip
        for n, item in enumerate(loader):
            where = f"{item.epoch}:{item.step}"
            steps.setdefault(where, {})[rank] = item.keys
            digests.setdefault(where, {})[rank] = sum(int(mb.input_ids.sum()) for mb in item.micro_batches)
            if n + 1 == max_steps:
                break
        states.append(loader.state())
    assert all(s == states[0] for s in states), states
    return {"steps": steps, "digests": digests, "state": states[0]}


def child(runs: list[list[int]], resume: dict[str, Any], shards: Path, model: Path) -> list[dict[str, Any]]:
    """Run `run_ranks` for every `[world_size, micro_batch, grad_accum, num_workers]` in a fresh process."""
    request = {"shards": str(shards), "model": str(model), "runs": runs, "resume": resume}
    command = [sys.executable, str(SCRIPT), json.dumps(request)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resume_in_new_processes_same_and_other_world_size(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loader_shards import write_shard_set
    from transformers import AutoTokenizer

    shards = tmp_path / "shards"
    write_shard_set(shards, AutoTokenizer.from_pretrained(tiny_model_dir), LAYOUT)
    # Uninterrupted: 2 ranks x (1 row x 2 micro-batches), no workers, 2 epochs.
    full = run_ranks(str(shards), str(tiny_model_dir), 2, 1, 2, 0, None, max_steps=-1)
    order = list(full["steps"])
    epoch0 = [w for w in order if w.startswith("0:")]
    assert len(epoch0) >= 3 and len(order) > len(epoch0)
    k = len(epoch0) - 1  # stop one step before the epoch ends, so the restart crosses into epoch 1

    # Stop after k steps (here), restart in a new process from the saved state.
    stopped = run_ranks(str(shards), str(tiny_model_dir), 2, 1, 2, 2, None, max_steps=k)
    assert list(stopped["steps"]) == order[:k]
    assert stopped["state"]["epoch"] == 0 and stopped["state"]["step"] == k
    state = json.loads(json.dumps(stopped["state"]))  # what a checkpoint stores
    # Same world size with another number of workers; then 1 rank x 2 rows x 2 micro-batches.
    same, single = child([[2, 1, 2, 1], [1, 2, 2, 0]], state, shards, tiny_model_dir)

    # Same world size: identical batches per rank.
    assert list(same["steps"]) == order[k:]
    for where in order[k:]:
        assert {int(r): v for r, v in same["steps"][where].items()} == full["steps"][where]
        assert same["digests"][where] == {str(r): v for r, v in full["digests"][where].items()}
    # One rank: the same 4 packs per global step, now all on rank 0.
    assert list(single["steps"]) == order[k:]
    for where in order[k:]:
        assert Counter(single["steps"][where]["0"]) == Counter(
            k for keys in full["steps"][where].values() for k in keys
        )


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    results = [
        run_ranks(request["shards"], request["model"], *run, resume=request["resume"], max_steps=-1)
        for run in request["runs"]
    ]
    print(json.dumps(results))
