"""Golden numbers: a short deterministic run must reproduce the stored per-step numbers, and greedy
generation from a fixed model the stored tokens.

Refactors change no number. A change that alters them on purpose regenerates the file in the same
commit (``GOLDEN_UPDATE=1 python -m pytest tests/integration/test_golden.py``) and says why."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from launch_helpers import common_args, torchrun_cmd

GOLDEN = Path(__file__).with_name("golden_losses.json")
REL = 1e-5
STEPS = 20

# name -> (ranks, extra arguments)
RUNS: dict[str, tuple[int, list[str]]] = {
    "zero2-2ranks-lora": (2, ["--deepspeed", "zero2", "--lora", "True"]),
    "zero3-2ranks-lora": (2, ["--deepspeed", "zero3", "--lora", "True"]),
    "zero2-1process-full-lm": (
        1,
        ["--deepspeed", "zero2", "--lora", "False", "--gradient_accumulation_steps", "4"],
    ),
}


def golden_args(model: Path, shards: Path, out: Path) -> list[str]:
    args = common_args(model, shards, out)
    args[args.index("--lr_scheduler_type") + 1] = "cosine"
    return [
        *args, "--warmup_steps", "3", "--learning_rate", "5e-3", "--max_steps", str(STEPS),
        "--save_steps", "0", "--eval.every", "10", "--eval.at_end", "true",
    ]  # fmt: skip


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def numbers(out: Path) -> dict[str, object]:
    """Per-step loss and grad norm, and the held-out NELBO of every evaluation."""
    loss: dict[int, float] = {}
    grad_norm: dict[int, float] = {}
    nelbo: dict[str, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            nelbo[str(record["step"])] = record["nelbo"]
        else:
            loss[record["step"]] = record["loss"]
            grad_norm[record["step"]] = record["grad_norm"]
    return {
        "loss": [loss[s] for s in sorted(loss)],
        "grad_norm": [grad_norm[s] for s in sorted(grad_norm)],
        "nelbo": nelbo,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_short_run_reproduces_golden_numbers(
    tiny_model_dir: Path, mixed_shards: Path, tmp_path: Path, run_cmd: Callable[..., CompletedProcess[str]],
    name: str,
) -> None:  # fmt: skip
    ranks, extra = RUNS[name]
    args = [*golden_args(tiny_model_dir, mixed_shards, tmp_path / name), *extra]
    cmd = [sys.executable, "-m", "trainer", "train", *args] if ranks == 1 else torchrun_cmd(ranks, args)
    run_cmd(cmd)
    got = numbers(tmp_path / name)
    assert len(got["loss"]) == STEPS  # type: ignore[arg-type]
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("GOLDEN_UPDATE") == "1":
        stored[name] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert name in stored, f"no golden numbers for {name}: run with GOLDEN_UPDATE=1 once"
    want = stored[name]
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=REL), key
    assert got["nelbo"] == pytest.approx(want["nelbo"], rel=REL)


def test_greedy_generation_of_a_fixed_model_reproduces_golden_tokens(tiny_model_dir: Path) -> None:
    """The seeded tiny model's canvases for four image questions (greedy, one block of 8 masks, one
    token a step, the whole canvas filled): the sampler's order, masks and positions, as numbers."""
    from PIL import Image

    from trainer.inference.generate import GenerationConfig, build_prompt, generate, load_model
    from trainer.model.tokens import SpecialTokens

    model = load_model(str(tiny_model_dir), device="cpu")
    prompts = [
        build_prompt(model.processor, f"What colour is the {name} square?", [Image.new("RGB", (64, 64), rgb)])
        for name, rgb in COLOURS.items()
    ]
    config = GenerationConfig(max_new_tokens=8, steps=8, block_size=8, stop_at_eos=False)
    generations = generate(
        model, prompts, config, SpecialTokens.from_tokenizer(model.tokenizer, model.config)
    )
    got = {"canvas": [g.canvas for g in generations], "commit_steps": [g.canvas_steps for g in generations]}
    stored = json.loads(GOLDEN.read_text())
    if os.environ.get("GOLDEN_UPDATE") == "1":
        stored["greedy-generation-tiny"] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert got == stored["greedy-generation-tiny"]
