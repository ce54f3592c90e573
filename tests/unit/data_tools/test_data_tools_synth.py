"""The synthetic demo set: answer space, meta, chance, held-out split, token budget of answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from data_tools import shards, synth
from data_tools.errors import BuildError
from data_tools.index import read_index, read_table, shard_samples


def test_default_demo_set(tmp_path: Path, tiny_model_dir: Path, data_tools_tokenizer: Any) -> None:
    synth.synthesize(tmp_path, str(tiny_model_dir), 48, 16, progress=False)
    train, test = read_index(tmp_path / "train"), read_index(tmp_path / "test")
    assert shards.verify(tmp_path / "train") == [] and shards.verify(tmp_path / "test") == []
    assert train["num_samples"] == 48 and test["num_samples"] == 16
    tasks = train["synth"]["tasks"]
    assert sorted(tasks) == sorted(synth.DEFAULT_TASKS)
    assert tasks["colour_en"] == {"choices": list(synth.COLOURS), "chance": pytest.approx(1 / 6)}
    assert tasks["shape_ko"]["chance"] == pytest.approx(1 / 4)
    seen_tasks = set()
    pad_lengths: list[int] = []
    for shard, samples in shard_samples(tmp_path / "train"):
        for e in samples:
            assert e["image_grid_thw"] == [[1, 4, 4]]  # 64x64 -> 2x2 merged patches = 4 image tokens
            sample = shards.read_sample(tmp_path / "train" / shard["name"], e["offset"], e["num_bytes"])
            meta = sample["json"]["meta"]
            seen_tasks.add(meta["task"])
            assert meta["answer"] in meta["choices"] and meta["choices"] == tasks[meta["task"]]["choices"]
            assert meta["lang"] == meta["task"].split("_")[1]
            j = sample["json"]
            target = [t for t, m in zip(j["input_ids"], j["answer_mask"], strict=True) if m]
            # The answer and <|im_end|>, then the build's default padding: up to 64 targets.
            text = meta["answer"] + "<|im_end|>"
            answer = data_tools_tokenizer.encode(text)
            assert target[: len(answer)] == answer and len(answer) <= len(target) <= 64
            pad_lengths.append(len(target) - len(answer))
    assert seen_tasks == set(synth.DEFAULT_TASKS)
    assert min(pad_lengths) < 8 and max(pad_lengths) > 20  # lengths drawn per sample
    # The held-out split is a different draw.
    ids = {s["key"] for s in read_table(tmp_path / "train").entries()}
    assert not ids & {s["key"] for s in read_table(tmp_path / "test").entries()}


def test_answers_are_few_tokens(data_tools_tokenizer: Any) -> None:
    for task in synth.TASKS.values():
        for answer in task.choices:
            n = len(data_tools_tokenizer.encode(answer, add_special_tokens=False))
            # English answer words are single tokens; Korean ones take at most 3.
            assert n == 1 if task.lang == "en" else n <= 3, (task.name, answer, n)


def test_seeded_and_all_tasks_render() -> None:
    a = synth.make_rows(16, list(synth.TASKS), seed=3, split="train")
    b = synth.make_rows(16, list(synth.TASKS), seed=3, split="train")
    c = synth.make_rows(16, list(synth.TASKS), seed=4, split="train")
    assert [r["images"] for r in a] == [r["images"] for r in b] != [r["images"] for r in c]
    assert {r["meta"]["task"] for r in a} == set(synth.TASKS)
    with pytest.raises(BuildError, match="unknown task"):
        synth.parse_tasks("colour_en,nope")
    with pytest.raises(BuildError, match="--tasks colour_en,nope: unknown task"):
        synth.SynthSettings(num=4, tasks=("colour_en", "nope")).validate()
    with pytest.raises(BuildError, match="--num 0: must be >= 1"):
        synth.SynthSettings(num=0).validate()


def test_help_states_the_answer_space(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        synth.main(["--help"])
    text = capsys.readouterr().out
    assert "red green blue yellow purple orange (1/6)" in text and "원 네모 세모 별 (1/4)" in text
