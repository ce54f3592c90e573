"""`trainer.model.positions.mrope_position_ids` equals stock `Qwen3VLModel.get_rope_index` per sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, Qwen3VLModel

from trainer.model.positions import mrope_position_ids


@pytest.fixture(scope="module")
def stock_model(tiny_model_dir: Path) -> Qwen3VLModel:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    # get_rope_index reads only the config; meta weights keep the build instant.
    with torch.device("meta"):
        return Qwen3VLModel(config)


def _conversation_ids(tiny_model_dir: Path, grids: list[list[int]], merge: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.convert_tokens_to_ids
    out = [ids("<|im_start|>"), *tokenizer.encode("user\n")]
    for i, (t, h, w) in enumerate(grids):
        out += [ids("<|vision_start|>")] + [ids("<|image_pad|>")] * (t * h * w // merge**2)
        out += [ids("<|vision_end|>"), *tokenizer.encode(f"page {i} says")]
    out += [*tokenizer.encode("What is the total?"), ids("<|im_end|>"), *tokenizer.encode("\n")]
    out += [ids("<|im_start|>"), *tokenizer.encode("assistant\n42 won"), ids("<|im_end|>")]
    return torch.tensor(out, dtype=torch.long)


@pytest.mark.parametrize(
    "grids",
    [[], [[1, 4, 6]], [[1, 6, 2], [1, 8, 8]]],
    ids=["text-only", "one-image", "two-images"],
)
def test_equals_stock_get_rope_index(
    stock_model: Qwen3VLModel, tiny_model_dir: Path, grids: list[list[int]]
) -> None:
    config = stock_model.config
    merge = config.vision_config.spatial_merge_size
    input_ids_L = _conversation_ids(tiny_model_dir, grids, merge)
    ours_3L = mrope_position_ids(
        input_ids_L,
        torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        spatial_merge_size=merge,
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
    if grids:
        mm_token_type_ids = (input_ids_L == config.image_token_id).int()[None]
        stock_3BL, _ = stock_model.get_rope_index(
            input_ids_L[None], mm_token_type_ids, image_grid_thw=torch.tensor(grids)
        )
        stock_3L = stock_3BL[:, 0]
    else:
        # Stock falls back to plain arange positions for text-only input (compute_3d_position_ids -> None).
        stock_3L = torch.arange(len(input_ids_L)).expand(3, -1)
    assert ours_3L.dtype == torch.long
    assert torch.equal(ours_3L, stock_3L)
    if grids:
        assert not torch.equal(ours_3L[1], ours_3L[2])  # the image really spreads over h and w


def test_pad_count_mismatch_is_an_error(stock_model: Qwen3VLModel, tiny_model_dir: Path) -> None:
    config = stock_model.config
    input_ids_L = _conversation_ids(tiny_model_dir, [[1, 4, 4]], 2)
    with pytest.raises(ValueError, match="image tokens"):
        mrope_position_ids(
            input_ids_L,
            [[1, 4, 8]],
            spatial_merge_size=2,
            image_token_id=config.image_token_id,
            vision_start_token_id=config.vision_start_token_id,
        )
