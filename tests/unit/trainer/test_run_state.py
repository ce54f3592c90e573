"""RunState: saved and restored as one value, also from a checkpoint written before a field existed."""

from __future__ import annotations

import json

from trainer.run.run_state import RunState


def test_round_trip_through_the_json_trainer_state() -> None:
    state = RunState(
        step=7, skipped_steps=1, consecutive_skips=1, samples_read=40, samples_skipped=3,
        skipped_by_reason={"corrupt": 2, "mismatch": 1}, skipped_where={"corrupt train-000000.tar": 2},
    )  # fmt: skip
    saved = json.loads(json.dumps({**state.to_state(), "data": {"epoch": 0, "step": 7}, "world_size": 2}))
    assert RunState.from_state(saved) == state


def test_an_older_checkpoint_restores_what_it_has_and_defaults_the_rest() -> None:
    restored = RunState.from_state({"step": 12, "skipped_steps": 2, "data": {}, "config_hash": "abc"})
    assert restored == RunState(step=12, skipped_steps=2)
