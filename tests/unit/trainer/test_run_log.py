"""MetricsWriter: metrics.jsonl on rank 0 and the logging.report_to backends (TensorBoard, wandb)."""

from __future__ import annotations

import json
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest

from trainer.config import LoggingConfig
from trainer.run.metrics_log import WANDB_ID_FILE, MetricsWriter


class FakeWandbRun:
    """Records what MetricsWriter asks of a wandb run (wandb is an optional extra, not installed in CI)."""

    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def log(self, data: dict[str, Any], step: int) -> None:
        self.calls.append(("log", (data, step)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """A stand-in ``wandb`` module in sys.modules; returns the list of calls made to it."""
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("wandb")
    module.__spec__ = ModuleSpec("wandb", loader=None)  # "installed", for the config check

    def init(**kwargs: Any) -> FakeWandbRun:
        calls.append(("init", kwargs))
        return FakeWandbRun(calls)

    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_the_config_the_scalars_and_one_run_across_resumes(
    tmp_path: Path, fake_wandb: list[tuple[str, Any]]
) -> None:
    out = tmp_path / "run-7"
    out.mkdir()
    logging = LoggingConfig(report_to=["wandb"], wandb_project="mdlm")
    resolved = {"optim": {"lr": 1e-4}, "logging": {"report_to": ["wandb"]}}
    with MetricsWriter(out, True, logging, resolved) as writer:
        writer.write({"kind": "train", "step": 3, "loss": 1.5, "lr": 1e-4, "nonfinite": False, "note": "x"})
        writer.write({"kind": "eval", "step": 3, "nelbo": 2.0})
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert fake_wandb == [
        ("init", {"project": "mdlm", "dir": str(out), "name": "run-7", "config": resolved, "id": run_id,
                  "resume": "allow"}),
        ("log", ({"train/loss": 1.5, "train/lr": 1e-4}, 3)),
        ("log", ({"eval/nelbo": 2.0}, 3)),
        ("finish", None),
    ]  # fmt: skip
    assert [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        "train",
        "eval",
    ]
    assert not (out / "tensorboard").exists()
    # A resumed launch continues the same wandb run; a fresh start in the same folder begins a new one.
    fake_wandb.clear()
    MetricsWriter(out, True, LoggingConfig(report_to=["wandb"], run_name="named"), resuming=True).close()
    assert fake_wandb[0][1]["id"] == run_id and fake_wandb[0][1]["name"] == "named"
    assert fake_wandb[0][1]["project"] is None  # wandb then reads WANDB_PROJECT
    fake_wandb.clear()
    MetricsWriter(out, True, logging, resuming=False).close()
    assert (out / WANDB_ID_FILE).read_text().strip() == fake_wandb[0][1]["id"] != run_id


def test_only_rank_zero_writes(tmp_path: Path, fake_wandb: list[tuple[str, Any]]) -> None:
    writer = MetricsWriter(tmp_path, False, LoggingConfig(report_to=["wandb", "tensorboard"]))
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert fake_wandb == [] and list(tmp_path.iterdir()) == []


def test_tensorboard_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    (tmp_path / "tb").mkdir()
    with MetricsWriter(tmp_path / "none", True, LoggingConfig(report_to=[])) as writer:
        writer.write({"step": 1, "loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["metrics.jsonl"]
    with MetricsWriter(tmp_path / "tb", True, LoggingConfig()) as writer:
        writer.write({"step": 1, "loss": 1.0})
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_wandb_offline_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logging = LoggingConfig(report_to=["wandb"])
    with MetricsWriter(tmp_path, True, logging, {"seed": 1}) as writer:
        writer.write({"kind": "train", "step": 1, "loss": 1.0})
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    with MetricsWriter(tmp_path, True, logging, {"seed": 1}, resuming=True) as writer:
        writer.write({"kind": "train", "step": 2, "loss": 0.5})
    # Both launches logged offline into output_dir/wandb, under the one run id.
    runs = [p.name for p in (tmp_path / "wandb").glob("offline-run-*")]
    assert len(runs) == 2 and all(run_id in name for name in runs), runs
