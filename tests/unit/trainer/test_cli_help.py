"""The command line: `train --help` generated from the config tree, `--help` pointers, `plan --config`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from data_tools import shards
from data_tools.index import make_index, write_index
from trainer.__main__ import main as trainer_main
from trainer.cli.train_help import MULTI_KEY_ALIASES, field_docs, format_default, train_help
from trainer.config import ALIASES, LoraConfig, TrainConfig, _all_keys, load_config
from trainer.data import Planner, load_catalog
from trainer.data.plan import PlanSpec, plan_summary


def _default(key: str) -> Any:
    value: Any = TrainConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def test_train_help_lists_every_key_alias_default_and_docstring(capsys: pytest.CaptureFixture) -> None:
    assert trainer_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == train_help()
    assert text.startswith("usage: python -m trainer train [--config FILE.yaml] [--dry-run]")
    for key in _all_keys():
        assert re.search(
            rf"^  --{re.escape(key)} \S+ \(default: {re.escape(format_default(_default(key)))}\)", text, re.M
        ), key
    for alias in ALIASES:
        assert re.search(rf"--{alias}\b(?![.\w])", text), alias
    assert "  --optim.lr float (default: 0.0002); also --learning_rate\n      Peak learning rate.\n" in text
    assert "--lora.r int (default: 16); also --r, --lora_r" in text
    assert "--lora.target_modules list[str] (default: q_proj,k_proj,v_proj,o_proj)" in text
    assert "\noptim: Optimizer.\n" in text and "\nschedule: Batch sizes, length of training" in text
    # The docstrings come from the source, whitespace collapsed.
    assert field_docs(LoraConfig)["alpha"] == "LoRA alpha (scale = alpha / r)."
    assert "keeps them frozen but for the ``<|mask|>`` row" in text


def test_every_multi_key_alias_is_described() -> None:
    assert set(MULTI_KEY_ALIASES) == {name for name, target in ALIASES.items() if target is None}
    assert "  --dataset_args DIR[train:N,test:M]\n" in train_help()


def test_top_level_help_points_to_command_help(capsys: pytest.CaptureFixture) -> None:
    assert trainer_main(["--help"]) == 0
    assert "train --help: every config key" in capsys.readouterr().out


def _write_index(directory: Path, lengths: list[int]) -> None:
    """An index.json of samples with these token lengths (the plan never opens a tar)."""
    directory.mkdir(parents=True)
    samples = [
        {"key": f"k{i}", "offset": 1024 * i, "num_bytes": 1024, "num_tokens": n, "num_answer_tokens": 1,
         "num_images": 0, "image_grid_thw": []}
        for i, n in enumerate(lengths)
    ]  # fmt: skip
    entry = {
        "name": shards.SHARD_PATTERN.format(0),
        "num_bytes": 1024 * len(lengths),
        "sha256": "",
        "samples": samples,
    }
    write_index(directory, *make_index([entry], {"fingerprint": "f", "name_or_path": "x"}, {}))


def test_plan_takes_config_and_overrides_like_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_index(tmp_path / "set", [30, 50, 20, 60, 40, 10, 70, 25] * 3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"name_or_path": str(tmp_path)}, "data": {"train": [str(tmp_path / "set")],
                        "max_tokens": 100, "limit_train": 20}, "seed": 3})
    )  # fmt: skip
    overrides = [
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--data.packing=false",
    ]
    assert trainer_main(["plan", "--config", str(recipe), *overrides, "--world-size", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    config = load_config(recipe, overrides)
    catalog = load_catalog([str(tmp_path / "set")], limit=20)
    expected = plan_summary(Planner(catalog, PlanSpec.from_config(config, 2)).plan(0), catalog, 2)
    assert printed == expected and printed["packs_per_step"] == 4 and printed["num_samples"] == 20
    assert trainer_main(["plan", f"--config={recipe}", "--epoch", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("epoch 1: ") and "world size: 1\n" in text and "steps per epoch: " in text
    # The same one-line errors as train.
    assert trainer_main(["plan", "--config", str(recipe), "--lr", "1"]) == 2
    assert capsys.readouterr().err == (
        "plan: error: unknown config key 'lr' in command line; did you mean '--learning_rate' (optim.lr)?\n"
    )
    # The shard-set form is still there.
    assert trainer_main(["plan", "--shards", str(tmp_path / "set"), "--max-tokens", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 24
