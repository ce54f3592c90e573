"""MDLM generation on the tiny Qwen3-VL (real model, real tokenizer, real image processor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from trainer.assets import load_processor
from trainer.config import ModelConfig
from trainer.sampling import (
    GenerationConfig,
    Prompt,
    SpecialTokens,
    build_prompt,
    generate,
    load_model,
    main,
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
