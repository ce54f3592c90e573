"""3-D M-RoPE position ids for one (sub-)sequence, equal to stock `Qwen3VLModel.get_rope_index`.

Packing needs position ids per sub-sequence (each sample starts again at 0), so they are computed
here from one sample's clean `input_ids` instead of by the model on the whole packed row. Pure
torch; no model, config or processor needed.

Layout (as in transformers 5.24): text tokens advance all three axes together; an image of
`grid_thw = [t, h, w]` (in 16-px patches) takes `t*h*w / merge**2` consecutive `<|image_pad|>`
tokens whose ids are `start + (t_idx, h_idx, w_idx)` over the merged grid, after which the text
position continues at `start + max(h, w) / merge`.
"""

from __future__ import annotations

import torch

__all__ = ["mrope_position_ids"]


def mrope_position_ids(
    input_ids_L: torch.Tensor,
    image_grid_thw: torch.Tensor | list[list[int]] | None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
) -> torch.Tensor:
    """M-RoPE position ids [3, L] (long) of one unpadded sequence.

    Args:
        input_ids_L: token ids [L] of one sequence, image pads expanded, no padding.
        image_grid_thw: [I, 3] grids of the sequence's images in order of appearance (None or
            empty for text-only sequences).
        spatial_merge_size: the vision config's `spatial_merge_size` (2 for Qwen3-VL).
        image_token_id: `<|image_pad|>` id (model config `image_token_id`).
        vision_start_token_id: `<|vision_start|>` id; every image's pad run must follow one.

    Raises:
        ValueError: when the image pads do not match the grids (count or placement).
    """
    if input_ids_L.dim() != 1:
        raise ValueError(f"input_ids_L must be 1-D, got shape {tuple(input_ids_L.shape)}")
    length = int(input_ids_L.shape[0])
    grids = _as_grid_list(image_grid_thw)
    is_image_L = input_ids_L == image_token_id
    num_image_tokens = int(is_image_L.sum())
    merge_area = spatial_merge_size * spatial_merge_size
    expected = sum(t * h * w // merge_area for t, h, w in grids)
    if num_image_tokens != expected:
        raise ValueError(
            f"sequence has {num_image_tokens} image tokens but image_grid_thw {grids} needs {expected}"
        )
    # Starts of the image pad runs; one run per image (stock groups runs the same way, and an image
    # always follows <|vision_start|> in the Qwen chat format, so two images never touch).
    image_starts = []
    cursor = 0
    image_positions = torch.nonzero(is_image_L).flatten().tolist()
    for t, h, w in grids:
        start = image_positions[cursor]
        if start == 0 or int(input_ids_L[start - 1]) != vision_start_token_id:
            raise ValueError(f"image pads at position {start} do not follow <|vision_start|>")
        image_starts.append((start, t, h, w))
        cursor += t * h * w // merge_area

    position_ids_3L = torch.empty(3, length, dtype=torch.long)
    text_start = 0  # index of the first token not yet given a position
    current = 0  # next position id
    for start, t, h, w in image_starts:
        text_len = start - text_start
        position_ids_3L[:, text_start:start] = torch.arange(current, current + text_len)
        current += text_len
        grid_t, grid_h, grid_w = t, h // spatial_merge_size, w // spatial_merge_size
        num_tokens = grid_t * grid_h * grid_w
        if not bool(is_image_L[start : start + num_tokens].all()):
            raise ValueError(f"image at position {start} has fewer pads than its grid {[t, h, w]}")
        # Stock: temporal index (time_interval 1) + start, height/width index + start.
        pos_t = torch.arange(grid_t).view(-1, 1, 1).expand(grid_t, grid_h, grid_w)
        pos_h = torch.arange(grid_h).view(1, -1, 1).expand(grid_t, grid_h, grid_w)
        pos_w = torch.arange(grid_w).view(1, 1, -1).expand(grid_t, grid_h, grid_w)
        position_ids_3L[:, start : start + num_tokens] = (
            torch.stack([pos_t, pos_h, pos_w]).reshape(3, -1) + current
        )
        current += max(h, w) // spatial_merge_size
        text_start = start + num_tokens
    position_ids_3L[:, text_start:] = torch.arange(current, current + length - text_start)
    return position_ids_3L


def _as_grid_list(image_grid_thw: torch.Tensor | list[list[int]] | None) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        return []
    rows = image_grid_thw.tolist() if isinstance(image_grid_thw, torch.Tensor) else image_grid_thw
    return [(int(t), int(h), int(w)) for t, h, w in rows]
