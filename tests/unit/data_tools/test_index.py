"""The columnar index: v1 sets upgrade in place to the same plans, atomic rewrites, clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main as cli
from data_tools.index import (
    COLUMNS_PREFIX,
    INDEX_VERSION,
    make_index,
    read_index,
    read_table,
    upgrade_index,
    write_index,
)
from trainer.data import Planner, PlanSpec, load_catalog
from trainer.data.plan import plan_summary

V1 = Path(__file__).parents[2] / "fixtures" / "index_v1"


@pytest.fixture
def v1_sets(tmp_path: Path) -> Path:
    """Copies of the two v1 shard sets (index.json only: the plans never open a tar)."""
    for name in ("set_a", "set_b"):
        shutil.copytree(V1 / name, tmp_path / name)
    return tmp_path


def test_a_v1_index_is_refused_with_the_upgrade_command(v1_sets: Path) -> None:
    with pytest.raises(ValueError, match=r"version-1 index .* `python -m data_tools upgrade-index .*set_a`"):
        load_catalog([v1_sets / "set_a"])


def test_upgraded_sets_plan_exactly_as_the_v1_catalog_did(
    v1_sets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plans stored in the fixture were computed by the v1 code (one Python object per sample)."""
    assert cli(["upgrade-index", str(v1_sets / "set_a"), str(v1_sets / "set_b")]) == 0
    assert capsys.readouterr().out.count(f"upgraded to index version {INDEX_VERSION}") == 2
    expected = json.loads((V1 / "plans.json").read_text())
    for case, want in expected.items():
        catalog = load_catalog([v1_sets / name for name in want["sets"]])
        planner = Planner(catalog, PlanSpec(weights=tuple(want["weights"]), **want["spec"]))
        got = [plan_summary(planner.plan(epoch), catalog, 2) for epoch in range(3)]
        assert json.loads(json.dumps(got)) == want["epochs"], case


def test_upgrade_keeps_every_field_and_is_idempotent(
    v1_sets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = v1_sets / "set_b"
    old = json.loads((directory / "index.json").read_text())
    old.update(num_rejected=2, rejects={"too_many_tokens": 2}, synth={"tasks": {}})  # as builds write
    (directory / "index.json").write_text(json.dumps(old))
    assert upgrade_index(directory) is True
    index = read_index(directory)
    for key in ("tokenizer", "build", "num_samples", "num_tokens", "num_images", "rejects", "synth"):
        assert index[key] == old[key], key
    assert [{k: s[k] for k in ("name", "num_bytes", "sha256")} for s in index["shards"]] == [
        {k: s[k] for k in ("name", "num_bytes", "sha256")} for s in old["shards"]
    ]
    table = read_table(directory)
    assert list(table.entries()) == [sample for shard in old["shards"] for sample in shard["samples"]]
    assert [p.name for p in directory.iterdir() if p.name.startswith(COLUMNS_PREFIX)] == [index["columns"]]
    # A second upgrade changes nothing.
    before = (directory / "index.json").read_bytes()
    assert cli(["upgrade-index", str(directory)]) == 0
    assert "already at index version" in capsys.readouterr().out
    assert (directory / "index.json").read_bytes() == before


def test_an_upgrade_interrupted_before_index_json_leaves_the_v1_set_as_it_was(
    v1_sets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = v1_sets / "set_a"
    before = (directory / "index.json").read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("data_tools.index.atomic_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        upgrade_index(directory)
    assert (directory / "index.json").read_bytes() == before
    monkeypatch.undo()
    assert upgrade_index(directory) is True and len(read_table(directory)) > 0


def test_a_rewrite_replaces_the_columns_and_damage_is_a_clear_error(v1_sets: Path) -> None:
    directory = v1_sets / "set_b"
    upgrade_index(directory)
    index, table = read_index(directory), read_table(directory)
    first = index["columns"]
    num_tokens = np.array(table.num_tokens)
    num_tokens[0] += 1
    write_index(directory, index, dataclasses.replace(table, num_tokens=num_tokens))
    second = read_index(directory)["columns"]
    assert second != first and not (directory / first).exists()
    assert int(read_table(directory).num_tokens[0]) == int(num_tokens[0])
    # A lost column file, then columns that disagree with index.json: each names the set and the fix.
    (directory / second / "offset.npy").unlink()
    with pytest.raises(ValueError, match=r"set_b: the sample columns .* unreadable .* rebuild the shard set"):
        load_catalog([directory])
    _, empty = make_index([], {"fingerprint": "f"}, {})
    write_index(directory, read_index(directory), empty)
    with pytest.raises(ValueError, match=r"hold 0 samples, index.json lists \d+"):
        read_table(directory)
