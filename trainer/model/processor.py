"""The Qwen3-VL processor (image processor + tokenizer): Qwen3-VL's image settings, the PIL image
processor, and loading a model folder's processor with or without torchvision."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import (
    ProcessorMixin,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# Qwen3-VL's image processor settings: 16-px patches, 2x2 merge, so one LM token per 32x32 pixels.
QWEN3_VL_IMAGE_PROCESSOR = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65_536, "longest_edge": 16_777_216},
}


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
