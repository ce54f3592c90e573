"""The offline Qwen tokenizer, the Qwen3-VL chat template and the make-tiny folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

from trainer.model.processor import load_processor
from trainer.model.tiny import build_tiny_model, make_tiny

SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "</think>": 151668,
    "<|mask|>": 151669,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_known_real_ids(tokenizer) -> None:
    assert tokenizer.encode("Hello", add_special_tokens=False) == [9707]
    assert tokenizer.encode(" world", add_special_tokens=False) == [1879]
    assert tokenizer.encode("user", add_special_tokens=False) == [872]
    assert tokenizer.encode("assistant", add_special_tokens=False) == [77091]
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert tokenizer.mask_token_id == 151669
    assert tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151670


def test_digits_split_and_nfc(tokenizer) -> None:
    # Qwen splits numbers into single digits.
    ids = tokenizer.encode("12345", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("12345")
    # Decomposed Hangul (NFD) is normalised to the composed form first.
    composed = "한국어 표"
    import unicodedata

    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tokenizer.encode(decomposed, add_special_tokens=False) == tokenizer.encode(
        composed, add_special_tokens=False
    )
    assert tokenizer.decode(tokenizer.encode(composed, add_special_tokens=False)) == composed


def test_matches_tiktoken_reference(tokenizer) -> None:
    """The converted BPE gives exactly tiktoken's ids on the same ranks and pattern."""
    import tiktoken

    from trainer.model.tokenizer import QWEN_PRETOKENIZE_REGEX, _read_bpe_ranks, qwen_tiktoken_path

    reference = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PRETOKENIZE_REGEX,
        mergeable_ranks=_read_bpe_ranks(qwen_tiktoken_path()),
        special_tokens={},
    )
    texts = [
        "The quick brown fox's 3.14159 jumps!\n\n  def f(x):\n\treturn x**2",
        "표 3의 2023년 매출액은 1,234억 원입니다. 합계는?",
        "表格中的数据是什么？ naïve café ☕ 🤖🎉",
        "   leading spaces and trailing   \n\n\n",
    ]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)


def test_chat_template_ids_with_image(tiny_model_dir: Path, tokenizer) -> None:
    processor = load_processor(tiny_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    image = Image.new("RGB", (64, 96), "red")  # on the 32-px grid already: 2 x 3 merged tokens
    batch = processor(text=[text], images=[image], return_tensors="pt", do_resize=False)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4]]

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    expected = (
        [151644, 872, 198, 151652]
        + [151655] * 6
        + [151653]
        + enc("What colour is it?")
        + [151645, 198, 151644, 77091, 198]
        + enc("red")
        + [151645, 198]
    )
    assert batch["input_ids"][0].tolist() == expected
    # No default system prompt; the generation prompt opens the assistant turn.
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")


def test_make_tiny_round_trip(tmp_path: Path) -> None:
    model = build_tiny_model(seed=3)
    out = make_tiny(tmp_path / "tiny", seed=3)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    input_ids = torch.tensor([[151644, 872, 198, 9707, 1879, 151645, 198]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        got = reloaded(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Same seed, same bytes: the folder is reproducible.
    again = make_tiny(tmp_path / "again", seed=3)
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (out, again)]
    assert digest[0] == digest[1]


def test_make_tiny_image_processor_range(tmp_path: Path) -> None:
    """The folder's resize range is what the processor applies (generate, data_tools defaults)."""
    out = make_tiny(tmp_path / "small-images", min_pixels=64 * 64, max_pixels=128 * 128)
    processor = load_processor(out)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], tokenize=False
    )
    batch = processor(text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # kept at 64x64, not raised to 65,536 px
