"""The offline Qwen tokenizer and the Qwen3-VL chat template.

The Hugging Face hub is out of reach on the machines this project is tested on, so the tokenizer is
rebuilt from the Qwen BPE ranks that ship as a plain file (`dashscope/resources/qwen.tiktoken`) in
the `dashscope` wheel. The file is read, the package is never imported. The result gives the same
ids as the published Qwen3-VL tokenizer for every text and special token, plus `<|mask|>` (151669).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
)

from trainer.model.tokens import MASK_TOKEN

NUM_BPE_TOKENS = 151_643
VOCAB_ROWS = 151_936  # embedding rows of every Qwen3-VL size (padded beyond the tokenizer)

# Qwen's pre-tokenizer: like GPT-4's but numbers split into single digits (\p{N}, not \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Added tokens of the published Qwen3-VL tokenizer, from id 151643 on, with their `special` flag
# (the tool and think markers are ordinary added tokens there: they are not skipped on decode).
QWEN3_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    (MASK_TOKEN, True),
)

# The Qwen3-VL (Instruct) chat template, reduced to what a training conversation uses: system, user
# and assistant turns whose content is a string or a list of {"type": "image"|"video"|"text"} parts.
# No default system prompt. Images become <|vision_start|><|image_pad|><|vision_end|>; the processor
# (or data_tools) expands the single <|image_pad|> to one pad per merged 32x32 patch.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class MissingAssetError(RuntimeError):
    """The Qwen BPE ranks cannot be found or read (a broken or missing `dashscope` install)."""


def qwen_tiktoken_path() -> Path:
    """Where the Qwen BPE ranks lie: inside the installed `dashscope` wheel (found, not imported)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            "the Qwen BPE ranks come from the `dashscope` wheel, which is not installed: "
            "run `pip install -e .[dev]` (or `pip install dashscope`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing: reinstall dashscope (`pip install --force-reinstall dashscope`)"
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if len(ranks) != NUM_BPE_TOKENS:
        raise MissingAssetError(f"{path}: expected {NUM_BPE_TOKENS} BPE ranks, found {len(ranks)}")
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into a byte-level BPE vocab and merges.

    Every split of a token into two known parts becomes a merge with the token's rank as its
    priority (ties by the parts' ranks), so any merge path tiktoken can take is available."""
    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def build_qwen_tokenizer(with_mask_token: bool = True) -> PreTrainedTokenizerBase:
    """The Qwen3-VL tokenizer, rebuilt offline; `<|mask|>` is id 151669 when `with_mask_token`."""
    vocab, merges = _vocab_and_merges(_read_bpe_ranks(qwen_tiktoken_path()))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # Whole pieces found in the vocab are taken as they are, as tiktoken does.
    backend.model.ignore_merges = True
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = QWEN3_VL_ADDED_TOKENS if with_mask_token else QWEN3_VL_ADDED_TOKENS[:-1]
    for content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=262_144,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    if with_mask_token:
        tokenizer.mask_token = MASK_TOKEN
    for offset, (content, _) in enumerate(added):
        assert tokenizer.convert_tokens_to_ids(content) == NUM_BPE_TOKENS + offset, content
    return tokenizer
