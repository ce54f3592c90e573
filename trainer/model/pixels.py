"""Image pixels between the loader and the vision tower: uint8 patches out of the workers, the image
processor's float pixel values made on the device.

The image processor rescales, normalises and patchifies in float32 on the CPU, and repeats every
frame over the temporal patch: per image that costs several times its JPEG decode. Workers instead
cut the decoded uint8 image into the processor's patch order (`image_patches`, one reshape and
transpose, one frame) and the model turns a whole batch into float pixel values where it feeds the
vision tower (`PixelNormaliser`: one table lookup, then the repeat over the temporal patch).
The table holds the processor's own output for every byte value of every channel, so the floats
are bit for bit those of the processor, whatever its backend, mean, std or rescale factor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import convert_to_rgb

__all__ = ["PixelNormaliser", "image_patches"]


def image_patches(image: Image.Image, patch_size: int, merge_size: int) -> torch.Tensor:
    """[h*w, C*p*p] uint8 patches of `image` (RGB as the image processor converts it: transparency onto
    white) in the processor's order: merge blocks row-major, their patches row-major, each patch
    channel, row, column. The image must lie on the grid (sides multiples of p * merge_size)."""
    # The processor's conversion where there is something to convert; on plain RGB it only copies.
    plain = image.mode == "RGB" and "transparency" not in image.info
    pixels = np.asarray(image) if plain else convert_to_rgb(image, return_numpy=True)  # [H, W, C]
    height, width, channels = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = pixels.reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, channels
    ).transpose(0, 3, 1, 4, 6, 2, 5)
    # numpy's strided copy is several times faster than torch's permute().contiguous() for uint8.
    return torch.from_numpy(np.ascontiguousarray(blocks).reshape(grid_h * grid_w, channels * patch_size**2))


class PixelNormaliser:
    """The image processor's pixel values [P, C*T*p*p] (float32) from uint8 patches [P, C*p*p]
    (`image_patches`), computed on the patches' device."""

    def __init__(self, image_processor: Any) -> None:
        """`image_processor`: a Qwen2-VL/Qwen3-VL image processor (the one the loader was given)."""
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        area = self.patch_size**2
        block = self.patch_size * self.merge_size
        # A ramp through all 256 byte values, shifted per channel so that a patch order or channel
        # order unlike the processor's maps one input byte to two outputs and is caught below.
        width = block * math.ceil(256 / block**2)
        values = np.arange(block * width)[:, None] + 85 * np.arange(3)
        ramp = Image.fromarray((values % 256).astype(np.uint8).reshape(block, width, 3))
        expected = image_processor(images=[ramp], do_resize=False, return_tensors="pt")["pixel_values"]
        patches = image_patches(ramp, self.patch_size, self.merge_size)
        channels = patches.shape[1] // area
        frames = expected.reshape(len(patches), channels, self.temporal_patch_size, area)
        first = frames[:, :, 0].reshape(patches.shape)
        self._offsets = torch.arange(channels).repeat_interleave(area) * 256
        index = patches.long() + self._offsets
        self._table = torch.zeros(channels * 256, dtype=expected.dtype)
        self._table[index] = first
        repeated = torch.equal(frames, frames[:, :, :1].expand_as(frames))
        if not repeated or not torch.equal(self._table[index], first):
            raise ValueError(
                f"{type(image_processor).__name__} does not normalise pixel by pixel in the Qwen patch "
                "order: the loader's uint8 patches cannot reproduce its pixel values"
            )
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        """Float pixel values [P, C*T*p*p] of uint8 patches [P, C*p*p], on the patches' device."""
        device = patches.device
        if device not in self._on_device:
            self._on_device[device] = (self._table.to(device), self._offsets.to(device))
        table, offsets = self._on_device[device]
        frame = table[patches.long() + offsets]  # [P, C*p*p]: the whole batch in one lookup
        num, area = len(patches), self.patch_size**2
        frame_PC1A = frame.view(num, -1, 1, area)
        # The processor repeats each frame over the temporal patch (channel-major): repeat it here.
        return frame_PC1A.expand(num, frame_PC1A.shape[1], self.temporal_patch_size, area).reshape(num, -1)
