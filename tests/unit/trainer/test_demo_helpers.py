"""Demo helpers without training: the progress lines read from metrics.jsonl, loss.png, the export folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer import demo
from trainer.demo import ProgressTail, format_progress, plot_curves


def _step(step: int, elapsed_s: float, loss: float = 1.0) -> dict[str, Any]:
    return {"step": step, "epoch": 0, "loss": loss, "elapsed_s": elapsed_s}


def _eval(step: int) -> dict[str, Any]:
    return {"kind": "eval", "step": step, "nelbo": 0.5, "masked_accuracy@1": 0.9, "masked_accuracy@0.5": 0.8}


def _append(path: Path, *records: dict[str, Any], partial: str = "") -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + partial)


def test_format_progress_shows_the_budget_that_stops_the_run() -> None:
    record = _step(150, 61.2, loss=1.23456)
    assert format_progress(record, 2000, 300.0) == "  step   150  loss 1.235  61/300 s"
    assert format_progress(record, 2000, 0.0) == "  step   150/2000  loss 1.235  61 s"
    assert format_progress(_eval(150), 2000, 300.0) == (
        "  step   150  held-out NELBO 0.500, masked-token accuracy 0.900"
    )


def test_progress_tail_reads_complete_new_records_every_eval_and_a_step_every_few_seconds(
    tmp_path: Path,
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    tail = ProgressTail(metrics, max_steps=100, time_limit_s=0.0, every_s=10.0)
    assert tail.poll() == []  # rank 0 has not written yet
    _append(metrics, _step(5, 2.0), _step(10, 4.0), _step(15, 13.0), partial='{"step": 20, "ep')
    assert tail.poll() == ["  step     5/100  loss 1.000  2 s", "  step    15/100  loss 1.000  13 s"]
    # The half-written line is read once complete; the steps in between stay quiet.
    _append(metrics, partial='och": 0, "loss": 2.0, "elapsed_s": 20.0}\n')
    assert tail.poll() == []
    _append(metrics, _step(25, 24.0, loss=0.5), _eval(25))
    assert tail.poll() == [
        "  step    25/100  loss 0.500  24 s",
        "  step    25  held-out NELBO 0.500, masked-token accuracy 0.900",
    ]
    assert tail.poll() == []


def test_training_launch_output_goes_to_the_log_and_its_progress_to_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "POLL_S", 0.05)
    metrics, log = tmp_path / "metrics.jsonl", tmp_path / "train.log"
    script = (
        "import json, sys, time\n"
        "print('rank output')\n"
        f"with open({str(metrics)!r}, 'a') as f:\n"
        "    for step in (5, 10):\n"
        "        f.write(json.dumps({'step': step, 'loss': 1.0, 'elapsed_s': step}) + '\\n'); f.flush()\n"
        "        time.sleep(0.2)\n"
        "sys.exit(3)\n"
    )
    tail = ProgressTail(metrics, max_steps=10, time_limit_s=0.0, every_s=0.0)
    assert demo._run_with_progress([sys.executable, "-c", script], log, tail) == 3
    assert log.read_text() == "rank output\n"
    printed = capsys.readouterr()
    assert "rank output" not in printed.out + printed.err
    assert printed.err.splitlines() == [
        "demo:   step     5/10  loss 1.000  5 s",
        "demo:   step    10/10  loss 1.000  10 s",
    ]


def _fake_report() -> dict[str, Any]:
    return {
        "chance": 0.2,
        "before": {"accuracy": 0.0},
        "after": {"accuracy": 0.95},
        "blank_images": {"accuracy": 0.22},
        "shuffled_images": {"accuracy": 0.16},
    }


def test_loss_plot_marks_chance_and_both_controls(tmp_path: Path) -> None:
    records = [_step(5, 2.0, loss=9.0), _step(10, 4.0, loss=3.0), _eval(10), _step(15, 6.0, loss=1.0)]
    out_png = tmp_path / "loss.png"
    figure = plot_curves(records, _fake_report(), out_png)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, ax_eval = figure.axes
    levels = {line.get_label(): set(line.get_ydata()) for line in ax_eval.lines}
    assert levels["chance (0.20)"] == {0.2}
    assert levels["trained, blank images (0.22)"] == {0.22}
    assert levels["trained, shuffled images (0.16)"] == {0.16}
    legend = [text.get_text() for text in ax_eval.get_legend().get_texts()]
    assert {"chance (0.20)", "trained, blank images (0.22)", "trained, shuffled images (0.16)"} <= set(legend)


@pytest.mark.parametrize(
    ("lora", "folder", "merge"), [(False, "trained-model", True), (True, "adapter", False)]
)
def test_export_folder_is_named_by_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora: bool, folder: str, merge: bool
) -> None:
    import trainer.inference.export

    calls = []
    monkeypatch.setattr(
        trainer.inference.export, "export", lambda ckpt, out, merge: calls.append((out, merge)) or out
    )
    assert demo._export("ckpt", tmp_path, lora) == tmp_path / folder
    assert calls == [(tmp_path / folder, merge)]
