"""Answer padding against learning speed: held-out accuracy by padding mode and generation canvas.

    python benchmarks/answer_padding.py --tasks digits demo --modes none fixed4 random64 ... [--steps 600]

Every run is the demo's: the same tiny random Qwen3-VL (`trainer.demo.TINY_SHAPE`, seed 0), the recipe
`configs/demo.yaml` (2 CPU ranks, DeepSpeed ZeRO-2, the whole language model trained, lr 6e-4 cosine, rows of
256 tokens), the same seed and the same number of optimizer steps; only the shards' answer padding and the
mode's training overrides differ. After training, `python -m trainer evaluate` generates the held-out answers
on one block of C masks (C = 8, 16, 32, 64; min(C, 16) denoising steps), exact match.

Tasks:
- `digits`: real handwritten digits (scikit-learn's `load_digits`: 1,797 scans, 8x8 pixels of 17 grey levels,
  from the UCI optical-recognition set), enlarged to 64x64 RGB, "Which digit is written here?" with a
  one-token answer ("0".."9", chance 0.10); 1,500 train / 297 held out, split by a seeded permutation. Written
  as a stranger's dataset (a JSONL of OpenAI `messages` + PNG files) and built by `python -m data_tools build`.
- `demo`: the demo's synthetic colour/shape questions (`python -m data_tools synth`, 6,000 / 192).

Modes (`MODES`): the build's `--answer-padding` / `--pad-answer-to` and the training overrides: `none`, `fixed4`
and `random64` weigh every pad target like an answer token (`diffusion.pad_weight 0`, the weighting before
2026-12-07), `random64-pw1` caps a sample's pads at one answer token together (`diffusion.pad_weight 1`).

Prints one table row per (task, mode): accuracy at every canvas, the held-out NELBO per answer token at
canvas 8, samples per optimizer step (from metrics.jsonl) and the training time; `--json` keeps them all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.demo import TINY_SHAPE, DemoConfig, train_command  # noqa: E402

MODES: dict[str, tuple[list[str], dict[str, str]]] = {
    # name: (data_tools build padding options, training overrides)
    "none": (["--pad-answer-to", "0"], {"diffusion.pad_weight": "0"}),
    "fixed4": (["--answer-padding", "fixed", "--pad-answer-to", "4"], {"diffusion.pad_weight": "0"}),
    "random64": (["--answer-padding", "random", "--pad-answer-to", "64"], {"diffusion.pad_weight": "0"}),
    "random64-pw1": (["--answer-padding", "random", "--pad-answer-to", "64"], {"diffusion.pad_weight": "1"}),
}
CANVASES = (8, 16, 32, 64)
"""Generation canvases evaluated (`--canvases` picks some)."""
MAX_STEPS_PER_CANVAS = 16
DIGITS_QUESTION = "Which digit is written here? Answer with the digit."
DIGITS_TRAIN = 1500


def run(command: list[str], log: Path) -> None:
    """Run one command with its output in `log`; raise with the log's tail when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    with open(log, "a", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"exit {code}: {' '.join(command[:6])} ...; see {log}:\n{log.read_text()[-2000:]}")


def write_digits(folder: Path, seed: int) -> dict[str, Path]:
    """scikit-learn's digits as a JSONL per split (OpenAI messages + a relative PNG path) and PNG files."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, indices in (("train", order[:DIGITS_TRAIN]), ("test", order[DIGITS_TRAIN:])):
        lines = []
        for i in indices:
            grey = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            image = Image.fromarray(grey, mode="L").resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
            name = f"images/digit-{i:04d}.png"
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            (folder / name).write_bytes(buf.getvalue())
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DIGITS_QUESTION}]},
                {"role": "assistant", "content": str(int(digits.target[i]))},
            ]
            lines.append(json.dumps({"id": f"digit-{i:04d}", "messages": messages, "images": [name]}))
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def build_shards(task: str, mode: str, model: Path, sources: Path, out: Path, log: Path) -> Path:
    """The task's shards under `out` with the mode's answer padding; returns the folder holding train/, test/."""
    from data_tools.synth import SYNTH_MAX_PIXELS, SYNTH_MIN_PIXELS

    padding = MODES[mode][0]
    pixels = ["--min-pixels", str(SYNTH_MIN_PIXELS), "--max-pixels", str(SYNTH_MAX_PIXELS)]
    if task == "demo":
        defaults = DemoConfig()
        run(
            [sys.executable, "-m", "data_tools", "synth", "--output", str(out), "--model", str(model),
             "--num", str(defaults.num_train), "--num-test", str(defaults.num_test), "--tasks", defaults.tasks,
             "--no-progress", *padding],
            log,
        )  # fmt: skip
        return out
    for split in ("train", "test"):
        run(
            [sys.executable, "-m", "data_tools", "build", "--source", str(sources / f"{split}.jsonl"),
             "--output", str(out / split), "--model", str(model), "--image-format", "png",
             "--metric", "exact_match", "--no-progress", *pixels, *padding],
            log,
        )  # fmt: skip
    return out


def evaluate(
    model: Path, checkpoint: Path, shards: Path, canvas: int, out: Path, log: Path
) -> dict[str, Any]:
    """Held-out exact match on one block of `canvas` masks (NELBO at the smallest canvas only)."""
    report = out / f"canvas_{canvas}.json"
    run(
        [sys.executable, "-m", "trainer", "evaluate", "--model", str(model), "--checkpoint", str(checkpoint),
         "--data", str(shards / "test"), "--max-new-tokens", str(canvas), "--block-size", str(canvas),
         "--steps", str(min(canvas, MAX_STEPS_PER_CANVAS)), "--metric", "exact_match",
         "--output", str(report), *([] if canvas == CANVASES[0] else ["--no-nelbo"])],
        log,
    )  # fmt: skip
    return json.loads(report.read_text(encoding="utf-8"))


def one_run(
    task: str, mode: str, steps: int, model: Path, sources: Path, out: Path, canvases: tuple[int, ...]
) -> dict[str, Any]:
    """Build, train `steps` steps, evaluate at every canvas; the row of the table."""
    from trainer.run.metrics_log import read_jsonl

    folder = out / task / mode
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text())["steps"] == steps:
        return json.loads(done.read_text())  # an earlier call of the same run finished it
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    log = folder / "log.txt"
    shards = build_shards(task, mode, model, sources, folder / "shards", log)
    config = DemoConfig(max_steps=steps, overrides=dict(MODES[mode][1]))
    started = time.perf_counter()
    run(train_command(config, model, shards, folder / "train"), log)
    train_s = time.perf_counter() - started
    records = [r for r in read_jsonl(folder / "train" / "metrics.jsonl") if "loss" in r]
    reports = {c: evaluate(model, folder / "train", shards, c, folder, log) for c in canvases}
    row = {
        "task": task,
        "mode": mode,
        "steps": steps,
        "accuracy": {str(c): reports[c]["accuracy"] for c in canvases},
        "nelbo": reports[canvases[0]]["nelbo"]["nelbo"],
        "samples_per_step": sum(r["num_samples"] for r in records) / max(len(records), 1),
        "answer_tokens_per_sample": sum(r["num_answer_tokens"] for r in records)
        / max(sum(r["num_samples"] for r in records), 1),
        "train_s": train_s,
    }
    done.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the runs."""
    head = (
        "| task | mode | "
        + " | ".join(f"acc@{c}" for c in CANVASES)
        + " | NELBO | samples/step | targets/sample | train s |"
    )
    lines = [head, "|" + " --- |" * (len(CANVASES) + 6)]
    for r in rows:
        accs = " | ".join(
            f"{r['accuracy'][str(c)]:.3f}" if str(c) in r["accuracy"] else "-" for c in CANVASES
        )
        nelbo = f"{r['nelbo']:.3f}"
        lines.append(
            f"| {r['task']} | {r['mode']} | {accs} | {nelbo} | {r['samples_per_step']:.1f} | "
            f"{r['answer_tokens_per_sample']:.1f} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse the flags, make the tiny model and the digits files once, run every (task, mode)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=("digits", "demo"), default=["digits", "demo"])
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run")
    parser.add_argument(
        "--out", default="runs/answer_padding", help="work folder (each run's folder is recreated)"
    )
    parser.add_argument("--canvases", type=int, nargs="+", choices=CANVASES, default=list(CANVASES))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from data_tools.synth import SYNTH_MAX_PIXELS, SYNTH_MIN_PIXELS
    from trainer.model.tiny import make_tiny

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seed = DemoConfig().train_config().seed
    model = out / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny(model, seed=seed, min_pixels=SYNTH_MIN_PIXELS, max_pixels=SYNTH_MAX_PIXELS, **TINY_SHAPE)
    sources = out / "digits-source"
    if "digits" in args.tasks and not (sources / "test.jsonl").exists():
        write_digits(sources, seed)
    rows = []
    for task in args.tasks:
        for mode in args.modes:
            rows.append(one_run(task, mode, args.steps, model, sources, out, tuple(sorted(args.canvases))))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
