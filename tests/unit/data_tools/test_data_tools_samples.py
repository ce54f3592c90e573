"""Tokenisation with the chat template: input_ids equal the stock processor's, masks cover the answers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_tools import images
from data_tools.samples import SampleError, tokenize_conversation, tokenizer_info


def _conversation() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You read documents."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "표의 제목은 무엇인가요?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2024년 매출 현황"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the total?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " 1,234 (USD)"}]},
    ]


def test_input_ids_equal_stock_processor(tiny_model_dir: Path, data_tools_tokenizer: Any) -> None:
    from trainer.model.processor import load_processor

    image = Image.new("RGB", (300, 200), "red")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    processed = images.process_image(buf.getvalue(), image_format="png")
    messages = _conversation()
    got = tokenize_conversation(data_tools_tokenizer, messages, [processed.num_tokens], "all")
    processor = load_processor(tiny_model_dir)
    text = processor.apply_chat_template(messages, tokenize=False)
    stock = processor(text=[text], images=[image], return_tensors="pt")
    assert stock["image_grid_thw"][0].tolist() == processed.grid_thw
    assert got.input_ids == stock["input_ids"][0].tolist()


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_answer_mask_covers_assistant_text(data_tools_tokenizer: Any, train_on: str) -> None:
    tok = data_tools_tokenizer
    out = tokenize_conversation(tok, _conversation(), [6], train_on)
    assert len(out.input_ids) == len(out.answer_mask)
    assert out.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 6
    # Contiguous runs of targets, decoded, are exactly the answers plus their <|im_end|>.
    runs: list[list[int]] = []
    for i, (tid, m) in enumerate(zip(out.input_ids, out.answer_mask, strict=True)):
        if m:
            if not (i and out.answer_mask[i - 1]):
                runs.append([])
            runs[-1].append(tid)
    decoded = [tok.decode(r) for r in runs]
    want = ["2024년 매출 현황<|im_end|>", " 1,234 (USD)<|im_end|>"]
    assert decoded == (want if train_on == "all" else want[-1:])
    # Nothing of the template or prompt is a target.
    first = out.answer_mask.index(1)
    assert tok.decode(out.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_errors(data_tools_tokenizer: Any) -> None:
    with pytest.raises(SampleError) as info:
        tokenize_conversation(
            data_tools_tokenizer, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], []
        )
    assert info.value.reason == "no_assistant_turn"
    with pytest.raises(SampleError) as info:
        tokenize_conversation(data_tools_tokenizer, _conversation(), [])
    assert info.value.reason == "image_count_mismatch"


def test_tokenizer_info(data_tools_tokenizer: Any) -> None:
    info = tokenizer_info(data_tools_tokenizer, "tiny")
    assert info["mask_token_id"] == data_tools_tokenizer.convert_tokens_to_ids("<|mask|>") == 151669
    assert len(info["fingerprint"]) == 64 and info["name_or_path"] == "tiny"


def _answer_targets(tokenized: Any) -> list[int]:
    """The targets of the last answer: contiguous, and (padded) the end of the sample."""
    start = tokenized.answer_mask.index(1)
    end = start + tokenized.answer_mask[start:].index(0) if 0 in tokenized.answer_mask[start:] else None
    assert end is None or end == len(tokenized.input_ids) - 1  # unpadded: the template's closing newline
    return tokenized.input_ids[start:end]


def test_fixed_padding_fills_a_canvas_with_endoftext(data_tools_tokenizer: Any) -> None:
    from data_tools.samples import AnswerPadding, tokenize_conversation

    tok = data_tools_tokenizer
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    plain = tokenize_conversation(tok, messages, [], "last")
    padded = tokenize_conversation(tok, messages, [], "last", AnswerPadding("fixed", 8, "eos"))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_start = plain.answer_mask.index(1)
    # "red" <|im_end|> then six <|endoftext|>, all targets, in place of the closing newline.
    assert padded.input_ids[:answer_start] == plain.input_ids[:answer_start]
    assert _answer_targets(padded) == [*tok.encode("red"), im_end] + [eos] * 6
    # An answer already as long as the canvas keeps its template ending.
    long_answer = [
        messages[0],
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "one two three four five six seven eight"}],
        },
    ]
    fixed = AnswerPadding("fixed", 8, "eos")
    assert tokenize_conversation(tok, long_answer, [], "last", fixed) == tokenize_conversation(
        tok, long_answer, [], "last"
    )


def test_random_rainbow_padding(data_tools_tokenizer: Any) -> None:
    from data_tools.samples import RAINBOW_PADS, AnswerPadding, tokenize_conversation

    tok = data_tools_tokenizer
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    answer = [*tok.encode("red"), tok.convert_tokens_to_ids("<|im_end|>")]
    rainbow = [tok.convert_tokens_to_ids(t) for t in RAINBOW_PADS]
    # draw 0 -> no extra pads; draw -> 1 -> up to the length; log-uniform in between.
    lengths = []
    for draw in (0.0, 0.5, 0.999999):
        padding = AnswerPadding("random", 64, "rainbow", draw)
        targets = _answer_targets(tokenize_conversation(tok, messages, [], "last", padding))
        assert targets[: len(answer)] == answer and len(targets) == padding.target_length(len(answer))
        pads = targets[len(answer) :]
        if pads:  # one <|endoftext|>, then the cycle of distinct pad tokens
            assert pads[0] == tok.convert_tokens_to_ids("<|endoftext|>")
            assert pads[1:] == [rainbow[i % len(rainbow)] for i in range(len(pads) - 1)]
        lengths.append(len(targets))
    assert lengths[0] == len(answer) and len(answer) < lengths[1] < lengths[2] == 64
    assert lengths[1] == len(answer) + int((64 - len(answer) + 2) ** 0.5) - 1
    # None of the rainbow tokens is ever written by the chat template or ordinary text.
    assert all(t in {x.content for x in tok.added_tokens_decoder.values() if x.special} for t in RAINBOW_PADS)
