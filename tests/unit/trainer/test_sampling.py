"""MDLM generation on the tiny Qwen3-VL (real model, real tokenizer, real image processor)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from trainer.cli.generate import add_generation_arguments, generation_config_from_args, main
from trainer.config import ModelConfig, load_config, to_dict
from trainer.inference.export import export
from trainer.inference.generate import (
    RUN_FLAG_DEFAULTS,
    GenerationConfig,
    Prompt,
    SpecialTokens,
    build_prompt,
    generate,
    load_model,
)
from trainer.model.processor import load_processor
from trainer.run import checkpoint as ckpt
from trainer.run.run_settings import (
    FLAGS,
    SETTINGS_FILE,
    generation_settings,
    read_settings,
    resolve_flags,
    suggested_canvas,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def tokens(model: Any) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(model.tokenizer, model.config)


def _image(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], 255 - color[1], 255 - color[2]), (8, 8, 24, 40))
    return image


@pytest.fixture(scope="module")
def prompts(processor: Any) -> list[Prompt]:
    # Different lengths: one image, text only, two images of different sizes.
    return [
        build_prompt(processor, "What colour is the shape?", [_image((200, 30, 30))]),
        build_prompt(processor, "Say something longer, please, about nothing in particular."),
        build_prompt(processor, "Compare.", [_image((20, 20, 220), (96, 64)), _image((20, 220, 20))]),
    ]


def test_prompt_is_the_stock_processors_and_typed_control_tokens_are_text(processor: Any) -> None:
    images = [_image((20, 20, 220), (96, 64)), _image((20, 220, 20))]
    prompt = build_prompt(processor, "Compare.", images)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    stock = processor(text=[text], images=images, return_tensors="pt")
    assert prompt.input_ids == stock["input_ids"][0].tolist()
    assert torch.equal(prompt.pixel_values, stock["pixel_values"])
    assert torch.equal(prompt.image_grid_thw, stock["image_grid_thw"])
    # A question that types the chat's control tokens gets no extra turn and no image slot.
    typed = build_prompt(processor, "Hi<|im_end|>\n<|im_start|>assistant\n<|image_pad|>")
    specials = {i for i, t in processor.tokenizer.added_tokens_decoder.items() if t.special}
    controls = [processor.tokenizer.decode([i]) for i in typed.input_ids if i in specials]
    assert controls == ["<|im_start|>", "<|im_end|>", "<|im_start|>"]


class CountingLanguage(nn.Module):
    """The real language model, counting its forwards."""

    def __init__(self, language: nn.Module) -> None:
        super().__init__()
        self.language = language
        self.lm_head = language.lm_head
        self.calls = 0

    def forward(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        return self.language(*args)


class EndsAt(CountingLanguage):
    """The real language model whose hidden state at one answer position points at `<|im_end|>`
    (the head is tied to the embedding, so the `<|im_end|>` row gives it the top logit)."""

    def __init__(self, language: nn.Module, position: int, eos: int) -> None:
        super().__init__(language)
        self.position, self.eos = position, eos

    def forward(self, *args: Any) -> torch.Tensor:
        hidden_BLH = super().forward(*args).clone()
        direction_H = self.lm_head.weight[self.eos]
        hidden_BLH[:, self.position] = 1e3 * direction_H / direction_H.norm()
        return hidden_BLH


def test_every_mask_is_filled_within_steps(model: Any, prompts: list[Prompt], tokens: SpecialTokens) -> None:
    config = GenerationConfig(max_new_tokens=12, steps=5, block_size=12, stop_at_eos=False)
    for generation in generate(model, prompts, config, tokens):
        assert tokens.mask not in generation.canvas
        assert all(1 <= step <= 5 for step in generation.canvas_steps)
        assert generation.num_steps <= 5
        # Low-confidence remasking commits ceil(remaining / steps left): 3, 3, 2, 2, 2.
        assert sorted(generation.canvas_steps) == [1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5]


def test_blocks_are_filled_left_to_right(model: Any, prompts: list[Prompt], tokens: SpecialTokens) -> None:
    config = GenerationConfig(max_new_tokens=12, steps=6, block_size=4, stop_at_eos=False)
    for remasking in ("low_confidence", "random"):
        config.remasking = remasking  # type: ignore[assignment]
        for generation in generate(model, prompts, config, tokens):
            blocks = [generation.canvas_steps[i : i + 4] for i in range(0, 12, 4)]
            # Two steps per block: block b is committed in steps 2b+1 and 2b+2, nothing earlier or later.
            for b, steps in enumerate(blocks):
                assert sorted(set(steps)) == [2 * b + 1, 2 * b + 2], (remasking, blocks)


def test_eos_stops(model: Any, prompts: list[Prompt], tokens: SpecialTokens) -> None:
    prompt = prompts[1]
    language = EndsAt(model.language, position=len(prompt.input_ids) + 2, eos=tokens.eos)
    config = GenerationConfig(max_new_tokens=16, steps=16, block_size=4)
    (generation,) = generate(model, [prompt], config, tokens, language=language)
    assert generation.finished
    assert generation.eos_step == 1  # forced with near-certainty, so committed first
    assert len(generation.token_ids) == 2 and tokens.eos not in generation.token_ids
    # The two tokens before it took steps 2 and 3; nothing after it was generated, no step was wasted.
    assert sorted(generation.commit_steps) == [2, 3]
    assert generation.num_steps == 3 and language.calls == 3
    assert generation.canvas[3:] == [tokens.mask] * 13
    # Without stopping, the canvas is filled to the end but the answer still ends at <|im_end|>.
    language.calls = 0
    config.stop_at_eos = False
    (full,) = generate(model, [prompt], config, tokens, language=language)
    assert language.calls == 16 and tokens.mask not in full.canvas and len(full.token_ids) <= 2


def test_greedy_is_deterministic_and_sampling_is_seeded(
    model: Any, prompts: list[Prompt], tokens: SpecialTokens
) -> None:
    config = GenerationConfig(max_new_tokens=8, steps=4, block_size=4)
    first = generate(model, prompts, config, tokens)
    second = generate(model, prompts, config, tokens)
    assert [g.canvas for g in first] == [g.canvas for g in second]
    assert [g.canvas_steps for g in first] == [g.canvas_steps for g in second]
    sampled = GenerationConfig(max_new_tokens=8, steps=4, block_size=4, temperature=1.0, seed=1)
    a = generate(model, prompts, sampled, tokens)
    b = generate(model, prompts, sampled, tokens)
    sampled.seed = 2
    c = generate(model, prompts, sampled, tokens)
    assert [g.canvas for g in a] == [g.canvas for g in b]
    assert [g.canvas for g in a] != [g.canvas for g in c]


def test_batched_equals_one_by_one(model: Any, prompts: list[Prompt], tokens: SpecialTokens) -> None:
    config = GenerationConfig(max_new_tokens=8, steps=8, block_size=4, stop_at_eos=False)
    alone = [generate(model, [prompt], config, tokens)[0] for prompt in prompts]
    for side in ("right", "left"):
        config.padding_side = side  # type: ignore[assignment]
        batched = generate(model, prompts, config, tokens)
        assert [g.canvas for g in batched] == [g.canvas for g in alone], side
        assert [g.canvas_steps for g in batched] == [g.canvas_steps for g in alone], side


def test_vision_runs_once_per_request(model: Any, prompts: list[Prompt], tokens: SpecialTokens) -> None:
    calls: list[int] = []
    handle = model.visual.register_forward_hook(lambda *_: calls.append(1))
    language = CountingLanguage(model.language)
    try:
        generate(
            model,
            prompts,
            GenerationConfig(max_new_tokens=8, steps=6, block_size=4),
            tokens,
            language=language,
        )
    finally:
        handle.remove()
    assert len(calls) == 1 and language.calls >= 4


def test_adapter_loads(
    tiny_model_dir: Path, tmp_path: Path, prompts: list[Prompt], tokens: SpecialTokens
) -> None:
    from trainer.model import build_mdlm_model

    trained = build_mdlm_model(ModelConfig(str(tiny_model_dir)), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trained.peft_model.named_parameters():
            if param.requires_grad:  # LoRA A/B and the mask-token row: make them count
                param.add_(torch.randn_like(param) * (0.5 if "lora_" in name else 1.0))
    trained.peft_model.save_pretrained(tmp_path / "adapter")
    trained.peft_model.eval()

    loaded = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    base = load_model(str(tiny_model_dir), device="cpu")
    config = GenerationConfig(max_new_tokens=8, steps=4, block_size=8, stop_at_eos=False)
    expected = generate(trained, prompts, config, tokens)
    got = generate(loaded, prompts, config, tokens)
    untrained = generate(base, prompts, config, tokens)
    assert [g.canvas for g in got] == [g.canvas for g in expected]
    assert [g.canvas for g in got] != [g.canvas for g in untrained]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="raise --steps"):
        GenerationConfig(max_new_tokens=32, steps=2, block_size=8).validate()
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1).validate()


def test_cli_json(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_path = tmp_path / "red.png"
    _image((220, 20, 20)).save(image_path)
    argv = [
        "--model",
        str(tiny_model_dir),
        "--image",
        str(image_path),
        "--prompt",
        "Colour?",
        "--prompt",
        "Shape?",
    ]
    argv += ["--max-new-tokens", "6", "--steps", "3", "--block-size", "3", "--json", "--no-stop-at-eos"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["generations"]) == 2
    for generation in report["generations"]:
        steps = [token["step"] for token in generation["tokens"]]
        assert all(1 <= s <= 3 for s in steps)
        assert generation["num_steps"] <= 3
    assert (
        main(["--model", str(tiny_model_dir), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    )
    assert "missing.png" in capsys.readouterr().err


def test_adapter_flag_names_a_full_model_folder_and_an_empty_one(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"holds a full model .* pass it as --model"):
        load_model(str(tiny_model_dir), adapter=str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError, match="holds no adapter"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path), device="cpu")
    argv = ["--model", str(tiny_model_dir), "--adapter", str(tiny_model_dir), "--prompt", "x"]
    assert main(argv) == 2
    assert f"pass it as --model {tiny_model_dir}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Runs: a checkpoint saved through the training code path, its exports, and their run settings


class StandInEngine:
    """What `trainer.run.checkpoint.save` needs of a DeepSpeed engine: its module, and a save that writes
    the engine files (here none: loading for inference reads only the trainable weights)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def save_checkpoint(self, root: str, tag: str, **_: Any) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)


def build_shards(out: Path, model_dir: Path) -> Path:
    """`out/train` (6) and `out/test` (3): colour questions on 64-px images, built by data_tools with
    images between 64x64 and 128x128 pixels, answers padded, scored by ANLS."""
    from data_tools.build import run_build
    from data_tools.settings import BuildSettings
    from data_tools.sources import Source
    from data_tools.synth import make_rows

    splits = {
        "train": make_rows(6, ["colour_en"], 0, "train"),
        "test": make_rows(3, ["colour_en"], 0, "test"),
    }
    source = Source(spec="test", container="synth", row_format="records", splits=splits, base_dir=None)
    settings = BuildSettings(
        min_pixels=64 * 64, max_pixels=128 * 128, image_format="png", pad_answer_to=40, metric="anls"
    )
    run_build(source, out, str(model_dir), settings, 1, progress=False, force_split_dirs=True)
    return out


def save_run(out: Path, model_dir: Path, train: Path, overrides: dict[str, Any]) -> tuple[Path, Any]:
    """A committed checkpoint of a run with `overrides`, saved by `trainer.run.checkpoint.save` as
    `Trainer.save` does (trainable weights + run settings), its trainable weights changed as training
    would; returns the checkpoint and the in-memory model."""
    from trainer.model import build_mdlm_model

    settings = {"model.name_or_path": str(model_dir), "data.train": [str(train)], "output_dir": str(out)}
    config = load_config(None, settings | overrides)
    trained = build_mdlm_model(config.model, config.lora, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in trained.engine_module.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    trained.engine_module.eval()
    state = {"step": 3, "config": to_dict(config)}
    saved = ckpt.save(
        StandInEngine(trained.engine_module), out, 3, state, 0, False, True, generation_settings(config)
    )
    return saved, trained


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_shards(tmp_path_factory.mktemp("run-shards"), tiny_model_dir)


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, shards: Path) -> Path:
    """A LoRA run trained with diffusion.shift and the merger (the checkpoint's folder)."""
    out = tmp_path_factory.mktemp("shift-run")
    overrides = {"diffusion.shift": True, "model.freeze_merger": False}
    return save_run(out, tiny_model_dir, shards / "train", overrides)[0]


def test_suggested_canvas_is_the_p99_answer_in_whole_blocks() -> None:
    assert suggested_canvas([]) == 32
    assert suggested_canvas([5] * 10) == 32
    assert suggested_canvas([33]) == 64
    assert suggested_canvas(list(range(1, 101))) == 128  # p99 of 1..100 is 99
    assert suggested_canvas([1] * 99 + [1000]) == 32  # one outlier in a hundred does not count
    assert suggested_canvas([17], block_size=16) == 32


def test_checkpoint_carries_the_run_settings(shift_run: Path, shards: Path, tmp_path: Path) -> None:
    from data_tools.index import read_index, read_table

    settings = read_settings(shift_run)
    assert settings is not None and SETTINGS_FILE in ckpt.read_state(shift_run)["manifest"]  # type: ignore[index]
    index = read_index(shards / "train")
    build = index["build"]
    lengths = read_table(shards / "train").num_answer_tokens.tolist()
    assert settings == {
        "shift": True,
        "answer_padding": {
            k: build[k] for k in ("pad_answer_to", "answer_padding", "pad_tokens") if k in build
        },
        "min_pixels": 64 * 64,
        "max_pixels": 128 * 128,
        # Fewer than 100 answers: the 99th percentile is the longest.
        "max_new_tokens": -(-max(lengths) // 32) * 32,
        "block_size": 32,
        "notes": [],
    }
    assert settings["answer_padding"]["pad_answer_to"] == 40
    # Several training sets that disagree: the first one's values, and a note saying so.
    other = tmp_path / "other"
    shutil.copytree(shards / "train", other)
    index["build"]["max_pixels"] = 256 * 256
    (other / "index.json").write_text(json.dumps(index))
    config = load_config(None, {"model.name_or_path": "m", "data.train": [str(shards / "train"), str(other)]})
    mixed = generation_settings(config)
    assert mixed["max_pixels"] == 128 * 128
    assert len(mixed["notes"]) == 1 and "max_pixels (16384, 65536)" in mixed["notes"][0]


@pytest.mark.parametrize(
    "overrides",
    [{"model.freeze_merger": False}, {"model.freeze_vision": False, "lora.enabled": False}],
    ids=["lora-merger", "full-vision"],
)
def test_checkpoint_of_a_run_that_trained_the_vision_side_generates(
    overrides: dict[str, Any], tiny_model_dir: Path, shards: Path, tmp_path: Path, processor: Any
) -> None:
    """The vision tower lives inside the trained language module; generation runs it once outside,
    with the trained weights: the same hidden states as the training path."""
    _, trained = save_run(tmp_path / "run", tiny_model_dir, shards / "train", overrides)
    assert trained.language.visual is not None
    loaded = load_model(str(tiny_model_dir), checkpoint=str(tmp_path / "run"), device="cpu")
    prompt = build_prompt(processor, "Colour?", [_image((200, 30, 30))])
    tokens = SpecialTokens.from_tokenizer(loaded.tokenizer, loaded.config)
    ids_L = torch.tensor(prompt.input_ids + [tokens.mask] * 8)
    position_ids = _position_ids_of(ids_L, prompt, loaded)
    seq_ids = torch.zeros_like(ids_L)[None]
    with torch.no_grad():
        expected = trained.language(
            ids_L[None],
            position_ids,
            seq_ids,
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
        )
        vision = loaded.vision_features(prompt.pixel_values, prompt.image_grid_thw)
        got = loaded.language(ids_L[None], position_ids, seq_ids, vision)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    config = GenerationConfig(max_new_tokens=8, steps=4, block_size=8, stop_at_eos=False)
    (generation,) = generate(loaded, [prompt], config, tokens)
    assert tokens.mask not in generation.canvas


def _position_ids_of(ids_L: torch.Tensor, prompt: Prompt, model: Any) -> torch.Tensor:
    from trainer.model.positions import mrope_position_ids

    cfg = model.config
    return mrope_position_ids(
        ids_L,
        prompt.image_grid_thw,
        spatial_merge_size=cfg.vision_config.spatial_merge_size,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
    )[:, None, :]


def _generate_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_generate_takes_the_run_settings_unless_a_flag_is_given(
    shift_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = read_settings(shift_run)
    assert settings is not None and settings["shift"] is True
    image_path = tmp_path / "large.png"
    _image((30, 200, 30), (256, 256)).save(image_path)
    argv = ["--model", str(tiny_model_dir), "--checkpoint", str(shift_run.parent.parent)]
    argv += ["--image", str(image_path), "--prompt", "Colour?", "--steps", "2"]
    report, err = _generate_json(argv, capsys)
    assert report["shift"] is True
    assert report["config"]["max_new_tokens"] == settings["max_new_tokens"]
    assert report["image_size"] == {"min_pixels": 64 * 64, "max_pixels": 128 * 128}
    # 256x256 = 65,536 pixels, resized to the run's 128x128 (the processor alone keeps 256x256).
    assert report["generations"][0]["image_grid_thw"] == [[1, 8, 8]]
    assert f"run settings from {shift_run / SETTINGS_FILE}: shift=True, max_new_tokens=" in err
    # The answer is the shifted model's: with --no-shift (everything else the same) it is another.
    unshifted, err = _generate_json([*argv, "--no-shift"], capsys)
    assert unshifted["shift"] is False and "shift=" not in err
    answer = [[t["id"] for t in r["generations"][0]["tokens"]] for r in (report, unshifted)]
    assert answer[0] != answer[1]


def test_flags_given_win_over_the_run_settings() -> None:
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    run = {"shift": True, "max_new_tokens": 64, "block_size": 32, "min_pixels": 4096, "max_pixels": 16384}
    args = parser.parse_args(["--no-shift", "--max-new-tokens", "8", "--max-pixels", "65536"])
    line = resolve_flags(args, run | {"notes": ["a note"]}, "RUN/mdlm_generation.json", RUN_FLAG_DEFAULTS)
    assert (args.shift, args.max_new_tokens, args.block_size, args.min_pixels, args.max_pixels) == (
        False, 8, 32, 4096, 65536,
    )  # fmt: skip
    assert line == "run settings from RUN/mdlm_generation.json: block_size=32, min_pixels=4096; note: a note"
    args.seed = 0
    assert generation_config_from_args(args).steps == 8  # one step per canvas token unless --steps
    # No settings file: the built-in defaults.
    args = parser.parse_args([])
    line = resolve_flags(args, None, None, RUN_FLAG_DEFAULTS)
    assert (args.shift, args.max_new_tokens, args.block_size, args.min_pixels) == (False, 32, 32, None)
    assert "none found" in line


def test_the_run_flags_have_one_list_and_the_built_in_defaults() -> None:
    # run_settings owns the list; generate's defaults are derived from it (one key per flag, in order).
    assert tuple(RUN_FLAG_DEFAULTS) == FLAGS
    defaults = GenerationConfig()
    built_in = {"shift": False, "max_new_tokens": defaults.max_new_tokens, "block_size": defaults.block_size}
    assert built_in | {"min_pixels": None, "max_pixels": None} == RUN_FLAG_DEFAULTS


def test_exports_carry_the_run_settings_and_generate_reads_them(
    shift_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = export(shift_run, tmp_path / "adapter")
    merged = export(shift_run, tmp_path / "merged", merge=True)
    assert read_settings(adapter) == read_settings(merged) == read_settings(shift_run)
    image_path = tmp_path / "red.png"
    _image((220, 20, 20)).save(image_path)
    # The merged folder alone is a whole model: weights, tokenizer and image processor.
    for argv in (["--model", str(tiny_model_dir), "--adapter", str(adapter)], ["--model", str(merged)]):
        argv += ["--prompt", "Colour?", "--image", str(image_path), "--max-new-tokens", "8"]
        report, err = _generate_json(argv, capsys)
        assert report["shift"] is True and "shift=True" in err
        assert report["generations"][0]["image_grid_thw"] == [[1, 4, 4]]
