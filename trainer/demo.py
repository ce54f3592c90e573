"""`python -m trainer demo`: watch a tiny Qwen3-VL learn to see, on a CPU, in minutes.

One command, fixed order:
1. `make-tiny` a random Qwen3-VL (text hidden 128, 4 layers; vision hidden 128, depth 2) with the
   real Qwen tokenizer (`OUT/tiny-model`);
2. render the synthetic colour/shape shards (`OUT/shards/{train,test}`, data_tools synth);
3. evaluate the untrained model (held-out accuracy by generation, NELBO);
4. train with DeepSpeed ZeRO-2 on 2 CPU processes (gloo), packing on, the whole language model but
   its frozen random [151936, 128] embedding (only the <|mask|> row trains; vision frozen at random
   init; LoRA on a random base cannot scale its logits and learns this far worse), at lr 6e-4,
   for a fixed wall-clock budget (`OUT/train`: metrics.jsonl, TensorBoard, checkpoints);
5. export the trained weights (`OUT/adapter`: a full model folder when the whole LM was trained, a
   PEFT adapter with LoRA), evaluate again, and run two controls on the trained model: every image
   blank, and every question paired with another held-out sample's image;
6. write `OUT/report.json` {"chance", "before", "after", "blank_images", "shuffled_images"},
   `OUT/metrics/*.json` (full evaluation reports), `OUT/loss.png`, and print a before/after table.

If the vision path reaches the diffusion language model, "after" is far above chance and both
controls fall back to about chance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.sampling import GenerationConfig

# Tiny model shape that learns the demo in minutes (DESIGN.md, "What a tiny model can learn").
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
    # out an answer among 151,936 tokens (see trainer.assets.tiny_config).
    "initializer_range": 0.1,
}


@dataclass
class DemoConfig:
    """Settings of one demo run (defaults: the README's `make demo`)."""

    output: str = "runs/demo"
    """Run directory (recreated: the demo always starts from scratch)."""
    num_train: int = 6000
    """Synthetic training samples (the default budget sees each about five times)."""
    num_test: int = 192
    """Held-out samples (evaluation and controls)."""
    tasks: str = "colour_en,colour_ko,shape_en,shape_ko"
    """Synthetic tasks (data_tools synth --tasks); all have chance <= 1/4."""
    train_seconds: float = 300.0
    """Wall-clock training budget (the loop checkpoints and stops at this limit)."""
    max_steps: int = 2000
    """Upper bound on optimizer steps (the time limit normally stops first)."""
    nproc: int = 2
    """DeepSpeed ranks (CPU processes, gloo)."""
    lora: bool = False
    """Train LoRA adapters instead of the whole language model (learns this task worse)."""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """LoRA targets when `lora` (attention and MLP: a random base needs the capacity)."""
    lr: float = 6e-4
    """Learning rate (AdamW, constant after warmup)."""
    micro_batch_size: int = 2
    """Packed rows per rank and step (about 9 samples per 256-token row: ~36 samples per step)."""
    max_tokens: int = 256
    """Tokens per packed row."""
    eval_every: int = 150
    """Steps between held-out NELBO evaluations during training (the eval curve of loss.png)."""
    seed: int = 0
    """Seed of model weights, data and training."""
    max_new_tokens: int = 8
    """Answer canvas for the held-out generation (one word + <|im_end|>)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def train_command(config: DemoConfig, model_dir: Path, shards: Path, train_dir: Path) -> list[str]:
    """The training launch: `torchrun` with `nproc` CPU ranks running `python -m trainer train`
    (each rank builds its DeepSpeed engine; gloo on CPU)."""
    overrides = {
        "output_dir": train_dir,
        "seed": config.seed,
        "model.name_or_path": model_dir,
        "model.attn_implementation": "sdpa",
        "lora.enabled": config.lora,
        # The [151936, 128] embedding is 97% of the tiny LM: training it costs most of each step.
        "model.train_embeddings": False,
        "lora.target_modules": config.lora_target_modules,
        "lora.dropout": 0.0,
        "data.train": shards / "train",
        "data.test": shards / "test",
        "data.max_tokens": config.max_tokens,
        "data.packing": True,
        "data.num_workers": 1,
        "optim.lr": config.lr,
        "optim.weight_decay": 0.0,
        "schedule.epochs": 100,
        "schedule.max_steps": config.max_steps,
        "schedule.micro_batch_size": config.micro_batch_size,
        "schedule.grad_accum_steps": 1,
        "schedule.lr_scheduler": "constant",
        "schedule.warmup_steps": 10,
        "schedule.time_limit_s": config.train_seconds,
        "checkpoint.save_every": 0,
        "checkpoint.save_at_end": True,
        "logging.log_every": 5,
        "logging.progress": False,
        "eval.every": config.eval_every,
        "eval.max_samples": config.num_test,
        "deepspeed.config": "zero2",
        "deepspeed.precision": "fp32",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={config.nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "trainer",
        "train",
    ]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _export(checkpoint: str, out: Path, lora: bool) -> Path:
    """The trained weights as a standard folder: a PEFT adapter (LoRA) or a full model folder (the
    whole language model was trained, so there is no adapter to keep apart)."""
    from trainer.export import export

    return export(checkpoint, out, merge=not lora)


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    nelbo = report.get("nelbo") or {}
    return {
        "accuracy": report["accuracy"],
        "nelbo": nelbo.get("nelbo"),
        "masked_accuracy@1": nelbo.get("masked_accuracy@1"),
        "per_task": {task: row["accuracy"] for task, row in report["per_task"].items()},
    }


def plot_curves(metrics_jsonl: Path, out_png: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    """loss.png: training loss per step (left) and held-out NELBO / accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line) for line in metrics_jsonl.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
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
    ax_eval.scatter([0, last_step], [before["accuracy"], after["accuracy"]], color="k", zorder=3,
                    label="generation accuracy (before / after)")  # fmt: skip
    ax_eval.set_xlabel("step")
    ax_eval.set_ylim(0, 1.02)
    ax_eval.legend(fontsize=8)
    ax_eval.set_title("held-out accuracy")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the report written to `OUT/report.json`."""
    import torch

    from data_tools.synth import SYNTH_MAX_PIXELS, SYNTH_MIN_PIXELS, synthesize
    from trainer.assets import load_processor, make_tiny
    from trainer.evaluate import evaluate_shards, format_table
    from trainer.sampling import load_model

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    out = Path(config.output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "metrics").mkdir()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    _log("1/5 tiny model")
    # The model's image processor resizes to the synthetic images' range, so `generate` on the
    # trained model sees images as training did (4 tokens, not Qwen's 64-token minimum).
    model_dir = make_tiny(
        out / "tiny-model",
        seed=config.seed,
        min_pixels=SYNTH_MIN_PIXELS,
        max_pixels=SYNTH_MAX_PIXELS,
        **TINY_SHAPE,
    )
    _log("2/5 synthetic shards")
    shards = out / "shards"
    synthesize(
        shards, str(model_dir), config.num_train, config.num_test, tasks=config.tasks.split(","),
        seed=config.seed, progress=False,
    )  # fmt: skip
    timings["setup_s"] = time.perf_counter() - started

    processor = load_processor(model_dir)
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens, steps=config.max_new_tokens, block_size=config.max_new_tokens
    )

    def evaluate(model: Any, image_mode: str) -> dict[str, Any]:
        report = evaluate_shards(
            model, shards / "test", processor, generation=generation, metric="exact_match",
            image_mode=image_mode, max_tokens=config.max_tokens, seed=config.seed,
        )  # fmt: skip
        name = {"normal": "after", "blank": "blank_images", "shuffled": "shuffled_images"}[image_mode]
        (out / "metrics" / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return report

    _log("3/5 evaluate the untrained model")
    t0 = time.perf_counter()
    untrained = load_model(str(model_dir), device="cpu")
    before = evaluate_shards(
        untrained, shards / "test", processor, generation=generation, metric="exact_match",
        max_tokens=config.max_tokens, seed=config.seed,
    )  # fmt: skip
    (out / "metrics" / "before.json").write_text(json.dumps(before, indent=2, ensure_ascii=False) + "\n")
    del untrained
    timings["eval_before_s"] = time.perf_counter() - t0

    _log(f"4/5 train: DeepSpeed ZeRO-2, {config.nproc} CPU ranks, {config.train_seconds:.0f} s")
    t0 = time.perf_counter()
    train_dir = out / "train"
    command = train_command(config, model_dir, shards, train_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(out / "train.log", "w", encoding="utf-8") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = (out / "train.log").read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"training failed (exit {done.returncode}); see {out / 'train.log'}:\n{tail}")
    timings["train_s"] = time.perf_counter() - t0
    from trainer.checkpoint import checkpoint_root, latest_valid

    checkpoint = latest_valid(checkpoint_root(train_dir))
    if checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint under {train_dir}; see {out / 'train.log'}")

    _log("5/5 export, evaluate the trained model and the controls")
    t0 = time.perf_counter()
    adapter = _export(str(checkpoint), out / "adapter", config.lora)
    if config.lora:
        trained = load_model(str(model_dir), adapter=str(adapter), device="cpu")
    else:
        trained = load_model(str(adapter), device="cpu")
    after = evaluate(trained, "normal")
    blank = evaluate(trained, "blank")
    shuffled = evaluate(trained, "shuffled")
    timings["eval_after_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    metrics_jsonl = train_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics_jsonl.read_text(encoding="utf-8").splitlines() if x.strip()]
    steps = max((r.get("step", 0) for r in records), default=0)
    plot_curves(metrics_jsonl, out / "loss.png", before, after)
    report = {
        "chance": before["chance"],
        "before": _summary(before),
        "after": _summary(after),
        "blank_images": _summary(blank),
        "shuffled_images": _summary(shuffled),
        "chance_per_task": {task: row["chance"] for task, row in before["per_task"].items()},
        "num_test": before["num_samples"],
        "train_steps": steps,
        "checkpoint": str(checkpoint),
        "adapter": str(adapter),
        "timings": timings,
        "config": config.__dict__,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(
        format_table({"before": before, "after": after, "blank_images": blank, "shuffled_images": shuffled})
    )
    print(
        f"\nchance {report['chance']:.3f}; trained {steps} steps in {timings['train_s']:.0f} s; "
        f"total {timings['total_s']:.0f} s; report: {out / 'report.json'}, curves: {out / 'loss.png'}"
    )
    return report


def main(argv: list[str]) -> int:
    """`python -m trainer demo [--output runs/demo] [--train-seconds S] ...`."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trainer demo",
        description="Synthetic demo: tiny Qwen3-VL -> shards -> DeepSpeed training on CPU -> evaluation "
        "before/after with blank- and shuffled-image controls -> OUT/report.json and OUT/loss.png.",
    )
    parser.add_argument("--output", default=defaults.output, help="run directory (recreated)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="training samples")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="held-out samples")
    parser.add_argument("--tasks", default=defaults.tasks, help="synthetic tasks (data_tools synth --tasks)")
    parser.add_argument("--train-seconds", type=float, default=defaults.train_seconds, help="training budget")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="step cap")
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="CPU ranks")
    parser.add_argument("--lora", action="store_true", help="train LoRA instead of the whole language model")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    parser.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="steps between NELBO evals"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed")
    args = parser.parse_args(argv)
    config = DemoConfig(
        output=args.output, num_train=args.num_train, num_test=args.num_test, tasks=args.tasks,
        train_seconds=args.train_seconds, max_steps=args.max_steps, nproc=args.nproc, lora=args.lora,
        lr=args.lr, eval_every=args.eval_every, seed=args.seed,
    )  # fmt: skip
    if config.nproc < 1 or config.num_train < 1 or config.num_test < 2 or config.train_seconds <= 0:
        print(
            "demo: error: --nproc, --num-train >= 1, --num-test >= 2 and --train-seconds > 0", file=sys.stderr
        )
        return 2
    try:
        run_demo(config)
    except (RuntimeError, ValueError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0
