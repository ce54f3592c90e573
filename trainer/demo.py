"""`python -m trainer demo`: watch a tiny Qwen3-VL learn to see, on a CPU, in minutes.

One command, fixed order:
1. `make-tiny` a random Qwen3-VL (text hidden 128, 4 layers; vision hidden 128, depth 2) with the
   real Qwen tokenizer (`OUT/tiny-model`);
2. render the synthetic colour/shape shards (`OUT/shards/{train,test}`, data_tools synth);
3. evaluate the untrained model (held-out accuracy by generation, NELBO);
4. train with DeepSpeed ZeRO-2 on 2 CPU processes (gloo), packing on, the whole language model but
   its frozen random [151936, 128] embedding (only the <|mask|> row trains; vision frozen at random
   init; LoRA on a random base cannot scale its logits and learns this far worse), at lr 6e-4 on a
   cosine schedule, for a fixed number of steps (`OUT/train`: metrics.jsonl, TensorBoard, checkpoints); the ranks'
   output goes to `OUT/train.log`, and the demo prints progress lines read from metrics.jsonl;
5. export the trained weights (`OUT/trained-model`: a full model folder, as the whole LM was trained;
   `OUT/adapter`: a PEFT adapter with `--lora`), evaluate again, and run two controls on the trained
   model: every image blank, and every question paired with another held-out sample's image;
6. write `OUT/report.json` {"chance", "before", "after", "blank_images", "shuffled_images"},
   `OUT/metrics/*.json` (full evaluation reports), `OUT/loss.png` (curves, with chance and the two
   controls marked), and print a before/after table.

If the vision path reaches the diffusion language model, "after" is far above chance and both
controls fall back to about chance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, load_config
from trainer.inference.generate import GenerationConfig
from trainer.run.distributed import free_port
from trainer.run.metrics_log import read_jsonl

# Tiny model shape that learns the demo in minutes (benchmarks/RESULTS.md, the demo figures).
TINY_SHAPE: dict[str, float] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 256,
    "vision_hidden_size": 128,
    "vision_depth": 2,
    "vision_heads": 2,
    # Row length of the frozen random embedding tied to the head: long enough for logits to single
    # out an answer among 151,936 tokens (see trainer.model.tiny.tiny_config).
    "initializer_range": 0.1,
}


CANVAS_STEPS = 16
"""Denoising steps of the evaluations at larger canvases (`DemoConfig.canvases`)."""

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# A training progress line at most this often (training seconds): about 20 lines for the default run.
PROGRESS_EVERY_S = 15.0
# How often the demo looks at metrics.jsonl while the ranks train.
POLL_S = 2.0


@dataclass
class DemoConfig:
    """Settings of one demo run (defaults: the README's `make demo`); the training recipe itself is
    `configs/demo.yaml`, to which the demo adds only paths and the budget."""

    output: str = "runs/demo"
    """Run directory (recreated: the demo always starts from scratch)."""
    num_train: int = 6000
    """Synthetic training samples (the default budget sees each about seven times)."""
    num_test: int = 192
    """Held-out samples (evaluation and controls)."""
    tasks: str = "colour_en,colour_ko,shape_en,shape_ko"
    """Synthetic tasks (data_tools synth --tasks); all have chance <= 1/4."""
    train_seconds: float = 0.0
    """Wall-clock training budget (the loop checkpoints and stops at this limit; 0 = none)."""
    max_steps: int = 1200
    """Optimizer steps: the budget is in steps, so every machine trains as far (and reports the same
    figures), and the recipe's cosine schedule ends at the last step."""
    nproc: int = 2
    """DeepSpeed ranks (CPU processes, gloo)."""
    recipe: str = str(DEMO_RECIPE)
    """The training config file."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides on top of the recipe (e.g. {"lora.enabled": True})."""
    max_new_tokens: int = 8
    """Answer canvas for the held-out generation (one word + <|im_end|>)."""
    answer_padding: str = "random"
    """Pad targets after each answer, as `data_tools build --answer-padding`: `random` (up to 64
    tokens), `fixed` (always 64) or `none` (learns fastest, but then the answer depends on the canvas)."""
    canvases: tuple[int, ...] = (8, 16, 32, 64)
    """Canvases at which the trained model is also evaluated: an answer must not depend on the room
    left for it (answer padding, docs/DESIGN.md §10)."""

    def train_config(self) -> TrainConfig:
        """The recipe with the overrides (what the ranks train with, less paths and budget)."""
        return load_config(self.recipe, dict(self.overrides))


def _log(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def train_command(config: DemoConfig, model_dir: Path, shards: Path, train_dir: Path) -> list[str]:
    """The training launch: `torchrun` with `nproc` CPU ranks running `python -m trainer train` on the
    recipe (each rank builds its DeepSpeed engine; gloo on CPU); only paths and budget are added."""
    overrides = {
        **config.overrides,
        "output_dir": train_dir,
        "model.name_or_path": model_dir,
        "data.train": shards / "train",
        "data.test": shards / "test",
        "schedule.max_steps": config.max_steps,
        "schedule.time_limit_s": config.train_seconds,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "trainer", "train",
        "--config", config.recipe,
    ]  # fmt: skip
    for key, value in overrides.items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        command += [f"--{key}", text]
    return command


def _export(checkpoint: str, out: Path, lora: bool) -> Path:
    """The trained weights as a standard folder: a PEFT adapter (LoRA) or a full model folder (the
    whole language model was trained, so there is no adapter to keep apart)."""
    from trainer.inference.export import export

    return export(checkpoint, out / ("adapter" if lora else "trained-model"), merge=not lora)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    nelbo = report.get("nelbo") or {}
    return {
        "accuracy": report["accuracy"],
        "nelbo": nelbo.get("nelbo"),
        "masked_accuracy@1": nelbo.get("masked_accuracy@1"),
        "per_task": {task: row["accuracy"] for task, row in report["per_task"].items()},
    }


def format_progress(record: dict[str, Any], max_steps: int, time_limit_s: float) -> str:
    """One terminal line for a metrics.jsonl record: a training step or a held-out evaluation."""
    step = record["step"]
    if record.get("kind") == "eval":
        return (
            f"  step {step:>5}  held-out NELBO {record['nelbo']:.3f}, "
            f"masked-token accuracy {record.get('masked_accuracy@1', float('nan')):.3f}"
        )
    elapsed = record["elapsed_s"]
    # Show the budget that binds: the time limit when one is set (it stops long before max_steps).
    where = f"{step:>5}" if time_limit_s else f"{step:>5}/{max_steps}"
    clock = f"{elapsed:.0f}/{time_limit_s:.0f} s" if time_limit_s else f"{elapsed:.0f} s"
    return f"  step {where}  loss {record['loss']:.3f}  {clock}"


@dataclass
class ProgressTail:
    """Follows a growing metrics.jsonl: `poll()` returns progress lines for the records appended since
    the last poll, every evaluation and a training step at most every `every_s` training seconds."""

    metrics_jsonl: Path
    max_steps: int
    time_limit_s: float
    every_s: float = PROGRESS_EVERY_S
    _offset: int = field(default=0, init=False)
    _next_print_s: float = field(default=0.0, init=False)

    def poll(self) -> list[str]:
        """Progress lines for the complete records written since the last call."""
        lines = []
        for record in self._new_records():
            if record.get("kind") != "eval":
                if record.get("loss") is None or record["elapsed_s"] < self._next_print_s:
                    continue
                self._next_print_s = record["elapsed_s"] + self.every_s
            lines.append(format_progress(record, self.max_steps, self.time_limit_s))
        return lines

    def _new_records(self) -> list[dict[str, Any]]:
        try:
            with open(self.metrics_jsonl, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:  # rank 0 has not written its first record yet
            return []
        # A line still being written is read at the next poll.
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], report: dict[str, Any], out_png: Path) -> Any:
    """loss.png: training loss per step (left) and held-out NELBO / accuracy (right), where chance and
    the trained model's two controls (blank, shuffled images) are horizontal lines; returns the
    (closed) matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") != "eval" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (MDLM)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["nelbo"] for r in evals], "o-", label="held-out NELBO")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("per answer token")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.set_title("MDLM loss")
    if evals:
        for key in ("masked_accuracy@1", "masked_accuracy@0.5", "masked_accuracy@0.15"):
            if key in evals[0]:
                ax_eval.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    last_step = train[-1]["step"] if train else 0
    before, after = report["before"]["accuracy"], report["after"]["accuracy"]
    ax_eval.scatter([0, last_step], [before, after], color="k", zorder=3,
                    label="generation accuracy (before / after)")  # fmt: skip
    for level, style, color, label in (
        (report["chance"], ":", "grey", "chance"),
        (report["blank_images"]["accuracy"], "--", "tab:red", "trained, blank images"),
        (report["shuffled_images"]["accuracy"], "-.", "tab:purple", "trained, shuffled images"),
    ):
        ax_eval.axhline(level, linestyle=style, color=color, label=f"{label} ({level:.2f})")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylim(0, 1.02)
    ax_eval.legend(fontsize=8)
    ax_eval.set_title("held-out accuracy")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return fig


def _prepare_environment() -> None:
    """For this process and the ranks it starts: name DeepSpeed's accelerator where there is no GPU
    (its auto-detection reaches the same answer but warns "Setting accelerator to CPU" in every
    process), and leave the terminal to the demo's own progress lines (no tqdm bars from loading and
    saving weights)."""
    import torch
    from transformers.utils import logging as transformers_logging

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by the ranks' transformers import
    transformers_logging.disable_progress_bar()  # this process imported transformers already


def _build_inputs(config: DemoConfig, out: Path) -> tuple[Path, Path]:
    """Steps 1-2: the tiny model folder and the synthetic shards."""
    from data_tools.synth import SYNTH_MAX_PIXELS, SYNTH_MIN_PIXELS, synthesize
    from trainer.model.tiny import make_tiny

    _log("1/5 tiny model")
    # The model's image processor resizes to the synthetic images' range, so `generate` on the
    # trained model sees images as training did (4 tokens, not Qwen's 64-token minimum).
    model_dir = make_tiny(
        out / "tiny-model", seed=config.train_config().seed, min_pixels=SYNTH_MIN_PIXELS, max_pixels=SYNTH_MAX_PIXELS,
        **TINY_SHAPE,
    )  # fmt: skip
    _log("2/5 synthetic shards")
    shards = out / "shards"
    synthesize(
        shards, str(model_dir), config.num_train, config.num_test, tasks=config.tasks.split(","),
        seed=config.train_config().seed, progress=False, answer_padding=config.answer_padding,
    )  # fmt: skip
    return model_dir, shards


def _run_with_progress(command: list[str], log_path: Path, progress: ProgressTail) -> int:
    """Run the training launch with its output (both ranks) in `log_path`, printing the progress lines
    of its metrics.jsonl meanwhile; returns the exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env) as launch,
    ):
        try:
            while True:
                try:
                    returncode = launch.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    returncode = None
                for line in progress.poll():
                    _log(line)
                if returncode is not None:
                    return returncode
        except BaseException:  # Ctrl-C or a bug here: torchrun passes SIGTERM on, the ranks stop
            launch.terminate()
            raise


def _train(config: DemoConfig, model_dir: Path, shards: Path, out: Path) -> Path:
    """Step 4: the ranks train; returns the committed checkpoint."""
    from trainer.run.checkpoint import checkpoint_root, latest_valid

    budget = f"{config.train_seconds:.0f} s" if config.train_seconds else f"{config.max_steps} steps"
    log_path = out / "train.log"
    _log(f"4/5 train: DeepSpeed ZeRO-2, {config.nproc} CPU ranks, {budget}")
    _log(f"    full output of the ranks: {log_path}; progress every {PROGRESS_EVERY_S:.0f} s of training:")
    train_dir = out / "train"
    command = train_command(config, model_dir, shards, train_dir)
    progress = ProgressTail(train_dir / "metrics.jsonl", config.max_steps, config.train_seconds)
    returncode = _run_with_progress(command, log_path, progress)
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"training failed (exit {returncode}); see {log_path}:\n{tail}")
    checkpoint = latest_valid(checkpoint_root(train_dir))
    if checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint under {train_dir}; see {log_path}")
    return checkpoint


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the report written to `OUT/report.json`."""
    import torch

    from trainer.inference.evaluate import evaluate_shards, format_table
    from trainer.inference.generate import load_model
    from trainer.model.processor import load_processor

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    _prepare_environment()
    recipe = config.train_config()
    out = Path(config.output)
    if out.exists():
        shutil.rmtree(out)
    (out / "metrics").mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model_dir, shards = _build_inputs(config, out)
    timings["setup_s"] = time.perf_counter() - started

    processor = load_processor(model_dir)

    def evaluate(
        model: Any, image_mode: str, name: str, canvas: int = config.max_new_tokens
    ) -> dict[str, Any]:
        # One block of `canvas` masks: the answer must find its own end. At most 16 steps (a larger
        # canvas commits several tokens a step, mostly pads): 64 steps on 64 masks would add minutes.
        steps = min(canvas, CANVAS_STEPS)
        generation = GenerationConfig(max_new_tokens=canvas, steps=steps, block_size=canvas)
        # The NELBO does not depend on the canvas: the larger canvases skip it (it is the "after" one).
        report = evaluate_shards(
            model, shards / "test", processor, generation=generation, metric="exact_match",
            image_mode=image_mode, with_nelbo=canvas == config.max_new_tokens, max_tokens=recipe.data.max_tokens,
            seed=recipe.seed,
        )  # fmt: skip
        (out / "metrics" / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return report

    _log("3/5 evaluate the untrained model")
    t0 = time.perf_counter()
    before = evaluate(load_model(str(model_dir), device="cpu"), "normal", "before")
    timings["eval_before_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    checkpoint = _train(config, model_dir, shards, out)
    timings["train_s"] = time.perf_counter() - t0

    _log("5/5 export, evaluate the trained model and the controls")
    t0 = time.perf_counter()
    exported = _export(str(checkpoint), out, recipe.lora.enabled)
    if recipe.lora.enabled:
        trained = load_model(str(model_dir), adapter=str(exported), device="cpu")
    else:
        trained = load_model(str(exported), device="cpu")
    results = {"before": before}
    for mode, name in (("normal", "after"), ("blank", "blank_images"), ("shuffled", "shuffled_images")):
        results[name] = evaluate(trained, mode, name)
    canvas_accuracy = {
        str(c): (
            results["after"] if c == config.max_new_tokens else evaluate(trained, "normal", f"canvas_{c}", c)
        )["accuracy"]
        for c in config.canvases
    }
    timings["eval_after_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    records = read_jsonl(out / "train" / "metrics.jsonl")
    steps = max((r.get("step", 0) for r in records), default=0)
    report = {
        "chance": before["chance"],
        **{name: _summary(result) for name, result in results.items()},
        "after_by_canvas": canvas_accuracy,
        "chance_per_task": {task: row["chance"] for task, row in before["per_task"].items()},
        "num_test": before["num_samples"],
        "train_steps": steps,
        "checkpoint": str(checkpoint),
        "exported": str(exported),
        "timings": timings,
        "config": {**config.__dict__, "overrides": {k: str(v) for k, v in config.overrides.items()}},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot_curves(records, report, out / "loss.png")
    print(format_table(results))
    print(
        "held-out accuracy by canvas: " + ", ".join(f"{c} tokens {a:.3f}" for c, a in canvas_accuracy.items())
    )
    print(
        f"\nchance {report['chance']:.3f}; trained {steps} steps in {timings['train_s']:.0f} s; "
        f"total {timings['total_s']:.0f} s; report: {out / 'report.json'}, curves: {out / 'loss.png'}; "
        f"trained weights: {exported}"
    )
    return report
