"""Parameter counts of the real Qwen3-VL-2B and -8B, assembled on the meta device (no weights).

The configs are written from the published numbers; the model goes through the same assembly code
as training (``trainer.model.assemble_mdlm_model``: bidirectional attention, ``<|mask|>``, frozen
vision, LoRA r16 on q/k/v/o, trainable mask row).

    python benchmarks/param_counts.py [--lora-r 16]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from trainer.config import LoraConfig
from trainer.model import assemble_mdlm_model
from trainer.model.tiny import qwen3_vl_config
from trainer.model.tokenizer import build_qwen_tokenizer

# Published sizes: (text hidden, layers, q heads, kv heads, intermediate, tied,
#                   vision depth, vision hidden, vision intermediate, vision heads, deepstack layers)
SIZES: dict[str, tuple[int, int, int, int, int, bool, int, int, int, int, list[int]]] = {
    "Qwen3-VL-2B": (2048, 28, 16, 8, 6144, True, 24, 1024, 4096, 16, [5, 11, 17]),
    "Qwen3-VL-8B": (4096, 36, 32, 8, 12288, False, 27, 1152, 4304, 16, [8, 16, 24]),
}


def published_config(name: str) -> Qwen3VLConfig:
    """The published config of ``name`` (a key of :data:`SIZES`)."""
    hidden, layers, heads, kv_heads, inter, tied, v_depth, v_hidden, v_inter, v_heads, deepstack = SIZES[name]
    text_config = {
        "vocab_size": 151_936,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 262_144,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": tied,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": v_depth,
        "hidden_size": v_hidden,
        "intermediate_size": v_inter,
        "num_heads": v_heads,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": deepstack,
        "hidden_act": "gelu_pytorch_tanh",
    }
    return qwen3_vl_config(text_config, vision_config, tie_word_embeddings=tied)


def count(name: str, lora_r: int = 16) -> dict[str, int]:
    """Language-model, vision and trainable parameter counts of ``name`` assembled for MDLM training."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(published_config(name))
    mdlm = assemble_mdlm_model(model, build_qwen_tokenizer(), lora=LoraConfig(r=lora_r, alpha=2 * lora_r))
    return mdlm.parameter_counts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    args = parser.parse_args(argv)
    print(
        f"{'model':<14}{'language model':>16}{'vision':>12}{'trainable (LoRA r' + str(args.lora_r) + ')':>24}"
    )
    for name in SIZES:
        counts = count(name, args.lora_r)
        print(
            f"{name:<14}{counts['language_model'] / 1e9:>15.3f}B{counts['vision'] / 1e9:>11.3f}B"
            f"{counts['trainable'] / 1e6:>22.2f}M  ({counts['trainable']:,})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
