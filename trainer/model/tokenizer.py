"""Offline Qwen3-VL assets: the real Qwen tokenizer, the Qwen3-VL chat template, tiny models.

The Hugging Face hub is out of reach on the machines this project is tested on, so the tokenizer is
rebuilt from the Qwen BPE ranks that ship as a plain file (`dashscope/resources/qwen.tiktoken`) in
the `dashscope` wheel. The file is read, the package is never imported. The result gives the same
ids as the published Qwen3-VL tokenizer for every text and special token, plus `<|mask|>` (151669).

`python -m trainer make-tiny OUT_DIR` writes a complete model folder (config, seeded random
weights, tokenizer with chat template, image processor) that stock transformers loads offline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

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

# Qwen3-VL's image processor settings: 16-px patches, 2x2 merge, so one LM token per 32x32 pixels.
QWEN3_VL_IMAGE_PROCESSOR = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65_536, "longest_edge": 16_777_216},
}


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


def build_image_processor(**overrides: object) -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor on the PIL backend (needs no torchvision)."""
    return Qwen2VLImageProcessorPil(**{**QWEN3_VL_IMAGE_PROCESSOR, **overrides})


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` for images and text only.

    The stock processor insists on a video processor, which needs torchvision, which does not
    import beside a CPU-only torch; this one declares no video attribute and is otherwise stock."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # type: ignore[no-untyped-def]
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)


def load_processor(name_or_path: str | Path) -> Qwen3VLProcessor:
    """The model's Qwen3-VL processor: stock where torchvision imports, images-and-text otherwise."""
    from transformers import AutoProcessor, AutoTokenizer

    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401

            return AutoProcessor.from_pretrained(str(name_or_path))
        except (ImportError, RuntimeError):
            pass  # a torchvision that does not match torch (seen with CPU builds): go without
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    # The class itself: AutoImageProcessor demands torchvision even for the PIL backend in 5.4-5.17.
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(name_or_path))
    return Qwen3VLImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def tiny_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    initializer_range: float = 0.02,
) -> Qwen3VLConfig:
    """A small but complete Qwen3-VL config with the real vocabulary and special-token ids.

    ``initializer_range`` is the std of the random text weights (embeddings included): with a
    frozen random embedding tied to the head, logits can only separate the 151,936 tokens if the rows
    are long enough (0.02 x sqrt(128) bounds a logit gap near 2.6; a trained Qwen's is far larger)."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden size {hidden_size} must divide by heads {num_heads}, and heads by kv heads {num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim % 8:
        raise ValueError(f"head_dim = hidden/heads = {head_dim} must be a multiple of 8 for M-RoPE sections")
    half = head_dim // 2
    # Qwen3-VL splits the rotary half-dimension 24/20/20 of 64 between t/h/w; keep that proportion.
    mrope_h = mrope_w = half * 5 // 16
    mrope_section = [half - mrope_h - mrope_w, mrope_h, mrope_w]
    text_config = {
        "vocab_size": VOCAB_ROWS,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 32_768,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": initializer_range,
        "bos_token_id": 151_643,
        "eos_token_id": 151_645,
        # No pad_token_id, as in the published configs: nn.Embedding would zero that row (and with
        # tied weights its logit), so <|endoftext|> could never be predicted.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 4,
        "num_heads": vision_heads,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": list(range(min(vision_depth, 3))),
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
    }
    return qwen3_vl_config(text_config, vision_config, tie_word_embeddings=True)


def qwen3_vl_config(
    text_config: dict[str, object], vision_config: dict[str, object], *, tie_word_embeddings: bool
) -> Qwen3VLConfig:
    """A ``Qwen3VLConfig`` of the given text and vision parts with Qwen's real vision token ids."""
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151_655,
        video_token_id=151_656,
        vision_start_token_id=151_652,
        vision_end_token_id=151_653,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model(*, seed: int = 0, **shape: float) -> Qwen3VLForConditionalGeneration:
    """A tiny random Qwen3-VL in memory (fp32, eval mode); `shape` as in `tiny_config`."""
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(tiny_config(**shape)).eval()


def make_tiny(
    out_dir: str | Path,
    *,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    **shape: float,
) -> Path:
    """Write a tiny random Qwen3-VL folder (seeded: the same seed gives the same weights).

    ``min_pixels``/``max_pixels`` set the image processor's resize range (default Qwen3-VL's): the
    range the model's images are trained at, which `generate` and `data_tools build` then use."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_model(seed=seed, **shape).save_pretrained(out, safe_serialization=True)
    build_qwen_tokenizer().save_pretrained(out)
    size = dict(QWEN3_VL_IMAGE_PROCESSOR["size"])
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    build_image_processor(size=size).save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE, encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer make-tiny",
        description="Write a tiny random Qwen3-VL model folder with the real Qwen tokenizer (offline).",
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--hidden-size", type=int, default=64, help="text hidden size")
    parser.add_argument("--num-layers", type=int, default=2, help="text decoder layers")
    parser.add_argument("--num-heads", type=int, default=4, help="text attention heads")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="text key/value heads")
    parser.add_argument("--intermediate-size", type=int, default=128, help="text MLP width")
    parser.add_argument("--vision-hidden-size", type=int, default=32, help="vision hidden size")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks")
    parser.add_argument("--vision-heads", type=int, default=2, help="vision attention heads")
    parser.add_argument(
        "--initializer-range", type=float, default=0.02, help="std of the random text weights"
    )
    parser.add_argument("--min-pixels", type=int, default=None, help="image resize floor (default 65536)")
    parser.add_argument("--max-pixels", type=int, default=None, help="image resize cap (default 16777216)")
    args = parser.parse_args(argv)
    try:
        out = make_tiny(
            args.out_dir,
            seed=args.seed,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            intermediate_size=args.intermediate_size,
            vision_hidden_size=args.vision_hidden_size,
            vision_depth=args.vision_depth,
            vision_heads=args.vision_heads,
            initializer_range=args.initializer_range,
        )
    except ValueError as err:
        parser.error(str(err))
    config = json.loads((out / "config.json").read_text())
    print(
        f"wrote {out} (text hidden {config['text_config']['hidden_size']}, "
        f"{config['text_config']['num_hidden_layers']} layers)"
    )
    return 0
