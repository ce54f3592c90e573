"""Conversation -> `input_ids`, `answer_mask`, `image_grid_thw` with the model's tokenizer and template.

The conversation is rendered with the tokenizer's own chat template (one `<|image_pad|>` per
image), tokenised once with character offsets, and each `<|image_pad|>` is then expanded to
H*W/1024 pads (one per merged 32x32 patch), as the Qwen3-VL processor does. The answer mask is 1
on the tokens of the assistant answers (the last one, or all, per `train_on`) and their
`<|im_end|>`; the character span of each answer comes from rendering the conversation up to that
turn with `add_generation_prompt=True` and taking what the next turn adds.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from data_tools.errors import BuildError

IMAGE_PAD = "<|image_pad|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
TRAIN_ON = ("last", "all")
ENDOFTEXT = "<|endoftext|>"
# Special tokens no Qwen3-VL chat uses (code fill-in-the-middle), as the rainbow's pad tokens.
RAINBOW_PADS = (
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
PADDING_MODES = ("random", "uniform", "fixed", "none")
PAD_TOKENS = ("eos", "rainbow")
# Stands for the N-th text part while finding where the template puts message text (private-use
# characters: no chat template writes them).
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


class SampleError(ValueError):
    """A conversation that cannot become a sample; `reason` is the reject reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AnswerPadding:
    """Pad targets after the last answer and its `<|im_end|>` (LLaDA's SFT recipe, docs/DESIGN.md §10).

    With bidirectional attention a training sequence that ends right after its answer tells the
    model where the answer ends; at generation the model sees a canvas of masks of another length.
    Pads teach it to end the answer anywhere inside a larger canvas and fill the rest with pads.
    - `mode` `fixed`: every answer padded to `length` targets (an answer as long keeps its ending);
      `random`: to a length drawn per sample between the answer's and `length`, the extra count
      log-uniform (`floor((room + 2) ** draw) - 1`, `draw` in [0, 1) from the sample's key), so
      short and long canvases are both seen at a few pads per sample on average; `uniform`: the
      extra count uniform in [0, room] (`floor(draw * (room + 1))`): long canvases seen as often as
      short ones, at more pad tokens per sample; `none`: no pads.
    - `tokens` `eos`: `<|endoftext|>` repeated; `rainbow`: one `<|endoftext|>`, then a cycle of
      distinct unused special tokens (`RAINBOW_PADS`), so no single pad token becomes the answer
      to every uncertain position of a long canvas (Rainbow Padding).
    """

    mode: str = "none"
    length: int = 0
    tokens: str = "eos"
    draw: float = 0.0

    def target_length(self, answer_length: int) -> int:
        """The number of targets the answer (with its `<|im_end|>`) is padded to."""
        room = self.length - answer_length
        if self.mode == "none" or room <= 0:
            return answer_length
        if self.mode == "fixed":
            return self.length
        if self.mode == "uniform":
            return answer_length + int(self.draw * (room + 1))
        return answer_length + int((room + 2) ** self.draw) - 1

    def pad_ids(self, tokenizer: Any, count: int) -> list[int]:
        """`count` pad ids: `<|endoftext|>`, then (rainbow) the cycle of `RAINBOW_PADS`."""
        eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        if self.tokens == "eos":
            return [eos_id] * count
        cycle = [tokenizer.convert_tokens_to_ids(t) for t in RAINBOW_PADS]
        return [eos_id, *(cycle[i % len(cycle)] for i in range(count - 1))][:count]


@dataclass
class Tokenized:
    """Token ids and the answer mask of one conversation, image pads expanded."""

    input_ids: list[int]
    answer_mask: list[int]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary, the special/added tokens and the chat template (cached on the tokenizer)."""
    cached = getattr(tokenizer, "_data_tools_fingerprint", None)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    added = sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items())
    h.update(json.dumps(added, ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps(tokenizer.all_special_tokens, ensure_ascii=False).encode("utf-8"))
    h.update((tokenizer.chat_template or "").encode("utf-8"))
    # Hashing 151k vocabulary entries takes ~0.5 s; builds ask once per split.
    tokenizer._data_tools_fingerprint = (tokenizer.chat_template, h.hexdigest())
    return h.hexdigest()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""The files a model folder's tokenizer is loaded from (those present are hashed)."""


def tokenizer_files_sha256(name_or_path: str) -> str | None:
    """sha256 over the tokenizer files of a local model folder (names and bytes); None for a hub id or
    a folder without them. Equal digests mean the same tokenizer without loading it (~2 s for Qwen's)."""
    folder = Path(name_or_path)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    if not present:
        return None
    h = hashlib.sha256()
    for name in present:
        h.update(name.encode("utf-8") + b"\0" + (folder / name).read_bytes() + b"\0")
    return h.hexdigest()


def tokenizer_info(tokenizer: Any, name_or_path: str) -> dict[str, Any]:
    """The `index.json` "tokenizer" block: fingerprint, files_sha256 (or null), name_or_path,
    mask_token_id (or null)."""
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id is None or mask_id == tokenizer.unk_token_id or MASK_TOKEN not in tokenizer.get_vocab():
        mask_id = None
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "files_sha256": tokenizer_files_sha256(name_or_path),
        "name_or_path": name_or_path,
        "mask_token_id": mask_id,
    }


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str) -> Any:
    """`AutoTokenizer.from_pretrained(name_or_path)` with a clear error when it has no chat template.

    Cached per process (builds only read the tokenizer)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise BuildError(f"--model {name_or_path}: cannot load a tokenizer ({e}); give a model folder") from e
    if not tokenizer.chat_template:
        raise BuildError(
            f"--model {name_or_path}: the tokenizer has no chat template; use a Qwen3-VL model folder"
        )
    if not tokenizer.is_fast:
        raise BuildError(f"--model {name_or_path}: a fast tokenizer (tokenizer.json) is needed for offsets")
    return tokenizer


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def answer_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, train_on: str
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the target answers in `text`, the rendered conversation.

    Each span covers the assistant's answer text and the template's `<|im_end|>` that closes it (the
    last one the turn renders: an answer that quotes `<|im_end|>` is not cut there).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise SampleError("no_assistant_turn", "the conversation has no assistant turn")
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise SampleError(
                "template_mismatch",
                "the chat template does not render turns as a prefix of the whole conversation",
            )
        end = upto.rfind(IM_END)
        if end < len(prompt):
            raise SampleError("template_mismatch", f"assistant turn {i} does not end with {IM_END}")
        spans.append((len(prompt), end + len(IM_END)))
    return spans


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The special (control) token strings of `tokenizer`: `<|im_end|>`, `<|image_pad|>`, `<|mask|>`, ..."""
    cached = getattr(tokenizer, "_data_tools_controls", None)
    if cached is None:
        cached = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        tokenizer._data_tools_controls = cached
    return cached


def _text_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, add_generation_prompt: bool
) -> list[tuple[int, int]]:
    """Character spans of the messages' text parts in `text` (the rendered conversation).

    Each text part is rendered as a numbered placeholder that no template writes; the spans come
    from putting the texts back, which must give `text` again (a template that rewrites message
    text cannot keep dataset text apart from its own control tokens)."""
    texts: list[str] = []
    marked = []
    for m in messages:
        parts = []
        for part in m["content"]:
            if part.get("type") == "text":
                parts.append({"type": "text", "text": f"\ue000{len(texts)}\ue001"})
                texts.append(part["text"])
            else:
                parts.append(part)
        marked.append({**m, "content": parts})
    rendered = _render(tokenizer, marked, add_generation_prompt)
    pieces = _PLACEHOLDER.split(rendered)
    spans: list[tuple[int, int]] = []
    rebuilt: list[str] = []
    pos = 0
    for j, piece in enumerate(pieces):
        if j % 2:
            piece = texts[int(piece)]
            spans.append((pos, pos + len(piece)))
        rebuilt.append(piece)
        pos += len(piece)
    if "".join(rebuilt) != text:
        raise SampleError("template_mismatch", "the chat template rewrites message text")
    return spans


def encode_text(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> tuple[str, list[int], list[tuple[int, int]]]:
    """`messages` rendered by the chat template, and its token ids and character offsets.

    Text from the dataset is always text: a control-token string typed inside a message (a user who
    writes `<|im_end|>` or `<|image_pad|>`) is encoded as the ordinary characters it is, so the chat
    structure, the image slots and the answer mask come from the template alone. Only conversations
    that hold such a string are re-encoded; the others keep the tokenizer's plain encoding.
    """
    text = _render(tokenizer, messages, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    controls = control_strings(tokenizer)
    if not any(
        c in part["text"]
        for m in messages
        for part in m["content"]
        if part.get("type") == "text"
        for c in controls
    ):
        return text, ids, offsets
    for start, end in reversed(_text_spans(tokenizer, messages, text, add_generation_prompt)):
        if not any(c in text[start:end] for c in controls):
            continue
        # Re-encode the tokens that overlap this text (from a token boundary, so the pieces join
        # exactly), with control strings read as characters.
        first = next(i for i, (a, b) in enumerate(offsets) if b > start)
        last = max(i for i, (a, b) in enumerate(offsets) if a < end)
        lo, hi = offsets[first][0], offsets[last][1]
        sub = tokenizer(
            text[lo:hi], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
        )
        ids[first : last + 1] = sub["input_ids"]
        offsets[first : last + 1] = [(a + lo, b + lo) for a, b in sub["offset_mapping"]]
    return text, ids, offsets


def encode_prompt(tokenizer: Any, messages: list[dict[str, Any]], image_num_tokens: list[int]) -> list[int]:
    """Token ids of `messages` plus the assistant header, image pads expanded, encoded as the build
    encodes training samples (`encode_text`): what generation feeds the model is what it trained on."""
    _, ids, _ = encode_text(tokenizer, messages, add_generation_prompt=True)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if ids.count(pad_id) != len(image_num_tokens):
        raise ValueError(f"the prompt has {ids.count(pad_id)} image slots for {len(image_num_tokens)} images")
    sizes = iter(image_num_tokens)
    return [t for tok in ids for t in ([tok] * next(sizes) if tok == pad_id else [tok])]


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    image_num_tokens: list[int],
    train_on: str = "last",
    padding: AnswerPadding | None = None,
) -> Tokenized:
    """Token ids (image pads expanded to `image_num_tokens[i]` each) and the answer mask.

    `messages` are normalised (`content` = list of `{"type": "image"}` / `{"type": "text"}` parts).
    `padding` pads the last answer (with its `<|im_end|>`) with pad targets in place of the template's
    closing newline (see `AnswerPadding`).
    """
    text, ids, offsets = encode_text(tokenizer, messages)
    spans = answer_spans(tokenizer, messages, text, train_on)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    num_pads = sum(1 for t in ids if t == pad_id)
    if num_pads != len(image_num_tokens):
        raise SampleError(
            "image_count_mismatch",
            f"the rendered text has {num_pads} image slots for {len(image_num_tokens)} images",
        )
    input_ids: list[int] = []
    answer_mask: list[int] = []
    span_i = 0
    image_i = 0
    for tok, (start, end) in zip(ids, offsets, strict=True):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        # A token is a target when it overlaps an answer span.
        target = int(span_i < len(spans) and end > spans[span_i][0] and start < spans[span_i][1])
        if tok == pad_id:
            n = image_num_tokens[image_i]
            image_i += 1
            input_ids.extend([pad_id] * n)
            answer_mask.extend([target] * n)
        else:
            input_ids.append(tok)
            answer_mask.append(target)
    if not any(answer_mask):
        raise SampleError("empty_answer", "the assistant answer has no tokens")
    if padding is not None and padding.mode != "none":
        input_ids, answer_mask = _pad_last_answer(tokenizer, input_ids, answer_mask, padding)
    return Tokenized(input_ids=input_ids, answer_mask=answer_mask)


def _pad_last_answer(
    tokenizer: Any, input_ids: list[int], answer_mask: list[int], padding: AnswerPadding
) -> tuple[list[int], list[int]]:
    last = max(i for i, m in enumerate(answer_mask) if m)
    first = last
    while first > 0 and answer_mask[first - 1]:
        first -= 1
    tail = input_ids[last + 1 :]
    if tokenizer.decode(tail).strip():
        return input_ids, answer_mask  # the conversation goes on after this answer: nothing to pad
    pad_ids = padding.pad_ids(tokenizer, padding.target_length(last + 1 - first) - (last + 1 - first))
    if not pad_ids:
        return input_ids, answer_mask  # an answer this long keeps its template ending
    return input_ids[: last + 1] + pad_ids, answer_mask[: last + 1] + [1] * len(pad_ids)
