"""Epoch plans from index.json alone (no tar exists here): packing, steps, carry, mixing, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools import shards
from data_tools.index import make_index, write_index
from trainer.cli.plan import shards_main as main
from trainer.data import Planner, PlanSpec, best_fit_pack, load_catalog


def write_index_only(directory: Path, lengths_per_shard: list[list[int]], prefix: str = "k") -> list[str]:
    """An index.json listing samples with the given token lengths; the tars are never opened."""
    directory.mkdir(parents=True)
    entries, keys, offset = [], [], 0
    for shard_id, lengths in enumerate(lengths_per_shard):
        samples = []
        for j, n in enumerate(lengths):
            key = f"{prefix}{shard_id}_{j}"
            samples.append(
                {"key": key, "offset": offset, "num_bytes": 1024, "num_tokens": n,
                 "num_answer_tokens": 1, "num_images": 0, "image_grid_thw": []}
            )  # fmt: skip
            keys.append(key)
            offset += 1024
        entries.append(
            {
                "name": shards.SHARD_PATTERN.format(shard_id),
                "num_bytes": offset,
                "sha256": "",
                "samples": samples,
            }
        )
    write_index(directory, *make_index(entries, {"fingerprint": "f", "name_or_path": "x"}, {}))
    return keys


def doc_qa_lengths(n: int, seed: int) -> list[int]:
    """Document-QA-like mix: many short text questions, page images of 300-1500 tokens, a few long ones."""
    rng = np.random.default_rng(seed)
    kind = rng.random(n)
    short = rng.integers(40, 200, n)
    page = rng.integers(300, 1500, n)
    long = rng.integers(1500, 3800, n)
    return np.where(kind < 0.4, short, np.where(kind < 0.9, page, long)).tolist()


def test_best_fit_pack_places_every_item_once_within_budget() -> None:
    lengths = doc_qa_lengths(2000, seed=0)
    bins = best_fit_pack(lengths, 4096, window=64)
    assert sorted(p for b in bins for p in b) == list(range(len(lengths)))
    assert all(sum(lengths[p] for p in b) <= 4096 for b in bins)
    efficiency = sum(lengths) / (len(bins) * 4096)
    assert efficiency >= 0.95, efficiency
    # A window of one is next-fit: the bound on open packs is what trades locality for fill.
    assert len(best_fit_pack(lengths, 4096, window=1)) > len(bins)
    assert best_fit_pack(lengths, 4096, window=64) == bins


def test_best_fit_prefers_the_tightest_open_pack() -> None:
    # Bins: [0] (room 4), [1] (room 2) -> item 2 (2 tokens) goes to the tighter bin 1.
    assert best_fit_pack([6, 8, 2, 4], 10, window=8) == [[1, 2], [0, 3]]


def test_plan_depends_on_the_global_batch_not_on_its_split(tmp_path: Path) -> None:
    write_index_only(tmp_path / "a", [[100, 300, 50] * 7, [220] * 5, [60, 400] * 9])
    catalog = load_catalog([tmp_path / "a"])
    plan = Planner(catalog, PlanSpec(weights=(1.0,), seed=5, max_tokens=512, packs_per_step=4)).plan(0)
    for world_size in (1, 2, 4):
        for step in range(plan.num_steps):
            joined = [p for r in range(world_size) for p in plan.rank_packs(step, r, world_size)]
            assert joined == plan.step_packs(step)
    other_seed = Planner(catalog, PlanSpec(weights=(1.0,), seed=6, max_tokens=512, packs_per_step=4)).plan(0)
    assert other_seed.packs != plan.packs


def test_carry_over_makes_every_sample_appear_once_per_epoch_cycle(tmp_path: Path) -> None:
    keys = write_index_only(tmp_path / "a", [[100, 300, 50, 90] * 5, [220] * 3, [60, 400, 10] * 4])
    catalog = load_catalog([tmp_path / "a"])
    planner = Planner(catalog, PlanSpec(weights=(1.0,), seed=1, max_tokens=512, packs_per_step=3))
    trained: list[int] = []
    for epoch in range(3):
        plan = planner.plan(epoch)
        assert plan.num_steps == len(plan.packs) // 3
        trained += [i for s in range(plan.num_steps) for p in plan.step_packs(s) for i in p]
    # Over 3 epochs every sample was drawn 3 times; all but the last epoch's remainder were trained.
    left = [i for p in planner.plan(2).remainder for i in p]
    assert Counter(trained + left) == Counter({i: 3 for i in range(len(keys))})
    # Recomputing a later epoch from scratch (a fresh process resuming) gives the same plan.
    fresh = Planner(catalog, PlanSpec(weights=(1.0,), seed=1, max_tokens=512, packs_per_step=3))
    assert fresh.plan(2).packs == planner.plan(2).packs


def test_drop_remainder_never_carries(tmp_path: Path) -> None:
    write_index_only(tmp_path / "a", [[100, 300, 50, 90] * 5])
    planner = Planner(load_catalog([tmp_path / "a"]), PlanSpec((1.0,), 1, 512, 3, drop_remainder=True))
    plan = planner.plan(1)
    assert plan.num_carried_in == 0 and plan.num_steps == plan.num_own_packs // 3


def test_weights_mix_sets_and_cycle_through_a_down_weighted_set(tmp_path: Path) -> None:
    keys_a = write_index_only(tmp_path / "a", [[100] * 10], prefix="a")
    keys_b = write_index_only(tmp_path / "b", [[100] * 4], prefix="b")
    catalog = load_catalog([tmp_path / "a", tmp_path / "b"])
    planner = Planner(catalog, PlanSpec(weights=(0.5, 2.0), seed=0, max_tokens=256, packs_per_step=2))
    per_epoch = [Counter(catalog.display_key(int(i)) for i in planner.epoch_samples(e)) for e in range(2)]
    for counts in per_epoch:
        assert sum(v for k, v in counts.items() if k.startswith("0:")) == 5
        assert counts == counts | {f"1:{k}": 2 for k in keys_b}
    # Half of set a per epoch; two epochs cover it exactly once.
    a_keys = [k for counts in per_epoch for k in counts if k.startswith("0:")]
    assert sorted(a_keys) == sorted(f"0:{k}" for k in keys_a)


def test_too_long_samples_are_excluded_and_counted(tmp_path: Path) -> None:
    write_index_only(tmp_path / "a", [[100, 900, 200, 50, 1200, 30, 40, 60]])
    plan = Planner(load_catalog([tmp_path / "a"]), PlanSpec((1.0,), 0, 512, 1)).plan(0)
    assert plan.num_too_long == 2 and plan.num_samples == 6


def test_too_few_packs_for_one_step_is_a_clear_error(tmp_path: Path) -> None:
    write_index_only(tmp_path / "a", [[100, 100]])
    with pytest.raises(ValueError, match="fewer than one global step"):
        Planner(load_catalog([tmp_path / "a"]), PlanSpec((1.0,), 0, 128, 8)).plan(0)


def test_plan_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = write_index_only(tmp_path / "a", [[100, 300, 50, 90] * 4, [220, 10] * 3])
    argv = ["--shards", str(tmp_path / "a"), "--world-size", "2", "--micro-batch", "1", "--grad-accum", "2",
            "--max-tokens", "512", "--seed", "3", "--epoch", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 2 and len(out["steps"]) == out["num_steps"] > 0
    assert all(len(step) == 2 and all(len(rank) == 2 for rank in step) for step in out["steps"])
    planned = [k for step in out["steps"] for rank in step for pack in rank for k in pack]
    remainder = [k for pack in out["remainder"] for k in pack]
    assert sorted(planned + remainder) == sorted(keys)
    assert 0 < out["packing_efficiency"] <= 1


def test_plan_cli_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shards", str(tmp_path / "missing"), "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "index.json" in err
