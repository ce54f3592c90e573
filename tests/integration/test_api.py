"""The Python API (trainer.api): the MDLM model for a script, and training in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch.distributed as dist
from PIL import Image, ImageDraw

from trainer.api import CONVERSATIONS_DIR, load_mdlm_model, train
from trainer.config import ConfigError
from trainer.run.checkpoint import read_state


def trainable_names(model: Any) -> list[str]:
    return [name for name, p in model.peft_model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("freeze_merger", [True, False])
def test_load_mdlm_model_freezes_the_vision_side_and_puts_lora_on_the_language_model(
    tiny_model_dir: Path, freeze_merger: bool
) -> None:
    model, processor = load_mdlm_model(tiny_model_dir, freeze_vision=True, freeze_merger=freeze_merger)
    trainable = trainable_names(model)
    assert any("language_model" in name and ".lora_" in name for name in trainable)
    assert not any(".lora_" in name and "visual" in name for name in trainable)  # LoRA on the LM only
    assert not any("visual.blocks" in name or "patch_embed" in name for name in trainable)  # tower frozen
    merger = [name for name in trainable if "merger" in name]
    assert bool(merger) is not freeze_merger, merger
    assert processor.tokenizer.convert_tokens_to_ids("<|mask|>") == model.mask_token_id


def test_load_mdlm_model_errors_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a model folder"):
        load_mdlm_model(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"lora='yes': pass True, False or a trainer.config.LoraConfig"):
        load_mdlm_model(tmp_path, lora="yes")  # type: ignore[arg-type]


def shape_image(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=colour)
    return image


def conversations(tmp_path: Path) -> list[dict[str, Any]]:
    """8 rows of both image forms: a PIL image in a content part, and a file path
    (str or Path) behind `<image>`."""
    colours = {"red": (230, 40, 30), "blue": (30, 70, 230)}
    rows: list[dict[str, Any]] = []
    for i in range(8):
        name = list(colours)[i % 2]
        if i < 4:
            question = [
                {"type": "image", "image": shape_image(colours[name])},
                {"type": "text", "text": "Colour?"},
            ]
            rows.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": name}]}
            )
        else:
            path = tmp_path / f"shape-{i}.png"
            shape_image(colours[name]).save(path)
            messages = [
                {"role": "user", "content": "<image>\nColour?"},
                {"role": "assistant", "content": name},
            ]
            rows.append({"id": f"file-{i}", "messages": messages, "images": [str(path) if i % 2 else path]})
    return rows


def test_train_from_conversations_in_this_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = {
        "model_name_or_path": str(tiny_model_dir), "output_dir": str(out), "max_steps": 2,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "max_seq_length": 160,
        "report_to": "none", "data.num_workers": 0, "logging.progress": False,
    }  # fmt: skip
    rows = conversations(tmp_path)
    # A bad row is named before any shard is built.
    bad = [*rows[:2], {"id": "no-answer", "messages": [{"role": "user", "content": "Colour?"}]}]
    with pytest.raises(ConfigError, match=r"conversations\[2\] \(id 'no-answer'\): .*no_assistant_turn"):
        train(conversations=bad, **settings)
    missing = [{"messages": rows[4]["messages"], "images": [str(tmp_path / "gone.png")]}]
    with pytest.raises(ConfigError, match=r"conversations\[0\]: image .*gone.png does not exist"):
        train(conversations=missing, **settings)
    with pytest.raises(ConfigError, match=r"conversations= is the training data: leave data\.train unset"):
        train(conversations=rows, **settings, **{"data.train": [str(tmp_path)]})
    with pytest.raises(ConfigError, match="pass the model's options instead of a model"):
        train(conversations=rows, model=object(), **settings)
    assert not list(out.glob("**/*.jsonl")) and not (out / "checkpoints").exists()
    # A row the shard build rejects (here: too long) is named before training starts.
    long = {
        "messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "la " * 200}]
    }
    with pytest.raises(
        ConfigError,
        match=r"1 of the conversations cannot be trained on: conversations\[8\]: .*too_many_tokens",
    ):
        train(conversations=[*rows, long], **{**settings, "output_dir": str(tmp_path / "rejected")})

    with mock.patch.dict(os.environ):  # a plain process: the run sets RANK, MASTER_PORT, ... for itself
        result = train(conversations=rows, **settings)
    assert not dist.is_initialized()
    assert result.step == 2 and len(result.losses) == 2 and not result.stopped_early
    assert result.output_dir == out and result.last_checkpoint == out / "checkpoints" / "step-00000002"
    assert read_state(result.last_checkpoint)["step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and result.metrics["step"] == 2 and result.metrics["loss"] == result.losses[-1]
    # One JSONL named by its content, and the images by theirs (a PIL image and its file are one PNG).
    (jsonl,) = (out / CONVERSATIONS_DIR).glob("conversations-*.jsonl")
    assert len(jsonl.read_text().splitlines()) == 8
    assert len(list((out / CONVERSATIONS_DIR / "images").iterdir())) == 2
    assert result.config.data.source == str(jsonl)
    index = json.loads((Path(result.config.data.train[0]) / "index.json").read_text())
    assert index["num_samples"] == 8 and index["num_rejected"] == 0


def test_a_second_run_in_this_process_gets_fresh_process_groups() -> None:
    """teardown drops DeepSpeed's cached groups with the process group: a notebook may call train again."""
    from deepspeed.utils import groups

    from trainer.run import distributed

    with mock.patch.dict(os.environ):
        for _ in range(2):
            distributed.setup()
            # What deepspeed.initialize asks first (its clone of the world group).
            assert dist.get_global_rank(groups._clone_world_group(), 0) == 0
            distributed.teardown()
    assert not dist.is_initialized()
