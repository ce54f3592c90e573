"""Reading one sample by offset, checking it against the index, and collating packs into batches.

`PackedBatch` is the contract between the loader and the model/loop (docs/CONTRACTS.md, Batches).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from data_tools.images import DisallowedImageFormat
from data_tools.shards import read_sample
from trainer.data.plan import SampleRef
from trainer.model.pixels import image_patches
from trainer.model.positions import mrope_position_ids
from trainer.model.tokens import ENDOFTEXT, IMAGE_PAD, VISION_START, token_id

__all__ = ["LoadedSample", "PackedBatch", "SampleReader", "collate_rows"]

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 8
"""Rows are padded to a multiple of this many tokens (tensor-core friendly shapes)."""


@dataclass
class LoadedSample:
    """One decoded, checked sample, ready to be packed."""

    key: str
    """Display key (see `Catalog.display_key`)."""
    input_ids: torch.Tensor
    """[n] long."""
    answer_mask: torch.Tensor
    """[n] bool: target tokens."""
    position_ids: torch.Tensor
    """[3, n] long M-RoPE ids of the sample alone."""
    pixel_values: torch.Tensor | None
    """[P, C*16*16] uint8 patches (`trainer.model.pixels.image_patches`), or the image processor's float
    [P, C*T*16*16] pixel values; None without images."""
    image_grid_thw: torch.Tensor | None
    """[I, 3] long, or None without images."""


@dataclass
class PackedBatch:
    """A micro-batch of B packed rows of length L (see docs/CONTRACTS.md, Batches).

    A row whose samples were all skipped (corrupt) and the padding batches of `EvalLoader` hold one
    dummy sub-sequence of `PAD_MULTIPLE` pad tokens with no answer tokens and keys `[]`, so every
    rank still runs the same forward/backward.
    """

    input_ids: torch.Tensor
    """[B, L] long; padding = pad id."""
    answer_mask: torch.Tensor
    """[B, L] bool."""
    seq_ids: torch.Tensor
    """[B, L] long: sub-sequence index inside its row, -1 on padding."""
    position_ids: torch.Tensor
    """[3, B, L] long: M-RoPE ids per sub-sequence, 0 on padding."""
    cu_seqlens: torch.Tensor
    """[N+1] int32 over the flattened [B*L] tokens: every sub-sequence is one segment and every
    row's padding tail one more, so `cu_seqlens[-1] == B*L` (flash varlen needs no unpadding)."""
    max_seqlen: int
    """Longest segment in `cu_seqlens`."""
    pixel_values: torch.Tensor | None
    """[P, C*16*16] uint8 patches, images in row-major order of appearance (the model normalises them
    on the device: `trainer.model.pixels`); float [P, C*T*16*16] where the samples held processor output;
    None without images."""
    image_grid_thw: torch.Tensor | None
    """[I, 3] long; None without images."""
    keys: list[list[str]]
    """Sample keys per row."""
    num_answer_tokens: int
    """answer_mask.sum()."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device`."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = (
                value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            )
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        """A copy in pinned host memory (called by DataLoader(pin_memory=True))."""
        pinned: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, torch.Tensor) else value
        return PackedBatch(**pinned)

    @property
    def num_real_tokens(self) -> int:
        """Tokens that belong to a sub-sequence (not padding)."""
        return int((self.seq_ids >= 0).sum())


class SampleReader:
    """Reads samples by offset, checks them against the index, makes uint8 image patches and positions.

    Bad samples (unreadable bytes, JSON or images; disagreement with the index) return None and are
    counted by reason in `skipped`; a warning is logged for the first of each reason and then at
    most once per `log_every_s` seconds per reason, with the running count.
    """

    def __init__(self, processor: Any, log_every_s: float = 30.0) -> None:
        """`processor`: a Qwen3-VL processor (`trainer.model.processor.load_processor`): tokenizer + image processor."""
        tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = token_id(tokenizer, IMAGE_PAD)
        self.vision_start_token_id = token_id(tokenizer, VISION_START)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else token_id(tokenizer, ENDOFTEXT))
        self.spatial_merge_size = int(self.image_processor.merge_size)
        self.patch_size = int(self.image_processor.patch_size)
        self.log_every_s = log_every_s
        self.skipped: Counter[str] = Counter()
        self.skipped_where: Counter[str] = Counter()
        """Skips by "REASON SHARD" (for the table printed when the skip budget is exceeded)."""
        self.num_read = 0
        """Samples this reader was asked for."""
        # Ids the tokenizer can produce; anything else (a shard of another vocabulary, corrupt
        # bytes that still parse) would index rows the model never trained.
        self.vocab_size = len(tokenizer)
        self._last_log: dict[str, float] = {}

    def read(self, ref: SampleRef, key: str) -> LoadedSample | None:
        """The sample at `ref`, or None (counted and logged) when it is corrupt, holds an image in a
        format off the allowlist, disagrees with the index or holds token ids outside the vocabulary."""
        self.num_read += 1
        try:
            raw = read_sample(ref.shard_path, ref.offset, ref.num_bytes)
        except DisallowedImageFormat as e:  # a known format the build never writes (EPS, PPM, ...)
            self._skip("image_format", key, ref, str(e))
            return None
        except Exception as e:  # any decode failure of untrusted bytes: tar, JSON, UTF-8, image codecs
            self._skip("corrupt", key, ref, f"{type(e).__name__}: {e}")
            return None
        try:
            return self._check_and_convert(raw, ref, key)
        except TokenRangeError as e:
            self._skip("token_out_of_range", key, ref, str(e))
        except (ValueError, KeyError, TypeError) as e:
            self._skip("mismatch", key, ref, str(e))
        return None

    def _check_and_convert(self, raw: dict[str, Any], ref: SampleRef, key: str) -> LoadedSample:
        sample = raw["json"]
        if sample.get("key") != ref.key:
            raise ValueError(f"json key {sample.get('key')!r} != index key {ref.key!r}")
        input_ids = torch.tensor(sample["input_ids"], dtype=torch.long)
        if len(input_ids) and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise TokenRangeError(
                f"token ids span [{int(input_ids.min())}, {int(input_ids.max())}], the tokenizer has {self.vocab_size}"
            )
        answer_mask = torch.tensor(sample["answer_mask"], dtype=torch.bool)
        if input_ids.dim() != 1 or len(input_ids) != ref.num_tokens or len(answer_mask) != len(input_ids):
            raise ValueError(
                f"{len(input_ids)} input ids / {len(answer_mask)} answer-mask entries, index says {ref.num_tokens}"
            )
        grids = [tuple(int(v) for v in g) for g in sample.get("image_grid_thw", [])]
        if tuple(grids) != ref.image_grid_thw or len(grids) != len(raw["images"]):
            raise ValueError(f"image grids {grids} / {len(raw['images'])} images disagree with the index")
        # Checked here, on the host, so the model need not read the count back from the device.
        num_pads = int((input_ids == self.image_token_id).sum())
        grid_tokens = sum(t * h * w for t, h, w in grids) // self.spatial_merge_size**2
        if num_pads != grid_tokens:
            raise ValueError(f"{num_pads} <|image_pad|> tokens, the image grids {grids} make {grid_tokens}")
        pixel_values = grid_thw = None
        if grids:
            for image, (_, h, w) in zip(raw["images"], grids, strict=True):
                # The shards hold images already on the Qwen grid: a second resize would change them.
                if image.size != (w * self.patch_size, h * self.patch_size):
                    raise ValueError(
                        f"image size {image.size} is not the grid {[h, w]} x {self.patch_size} px"
                    )
            # uint8, not the processor's floats: the model normalises a whole batch on the device.
            merge = self.spatial_merge_size
            patches = [image_patches(image, self.patch_size, merge) for image in raw["images"]]
            pixel_values = patches[0] if len(patches) == 1 else torch.cat(patches)  # one image: no copy
            grid_thw = torch.tensor(grids, dtype=torch.long)
        position_ids = mrope_position_ids(
            input_ids,
            grid_thw,
            spatial_merge_size=self.spatial_merge_size,
            image_token_id=self.image_token_id,
            vision_start_token_id=self.vision_start_token_id,
        )
        return LoadedSample(key, input_ids, answer_mask, position_ids, pixel_values, grid_thw)

    def _skip(self, reason: str, key: str, ref: SampleRef, detail: str) -> None:
        self.skipped[reason] += 1
        self.skipped_where[f"{reason} {Path(ref.shard_path).name}"] += 1
        now = time.monotonic()
        last = self._last_log.get(reason)
        if last is None or now - last >= self.log_every_s:
            self._last_log[reason] = now
            logger.warning(
                "skipped sample %s (%s at offset %d): %s: %s [%d %s so far in this reader]",
                key, ref.shard_path, ref.offset, reason, detail, self.skipped[reason], reason,
            )  # fmt: skip


class TokenRangeError(ValueError):
    """A sample holds token ids the tokenizer cannot produce."""


def collate_rows(rows: list[list[LoadedSample]], pad_token_id: int) -> PackedBatch:
    """Pack each row's samples side by side and pad the rows to one length (a multiple of 8).

    Each sample keeps its own position ids (from `mrope_position_ids` of the sample alone) and gets
    its own `seq_ids` value; an empty row becomes one dummy sub-sequence of pad tokens.
    """
    if not rows:
        raise ValueError("cannot collate an empty micro-batch")
    lengths = [sum(len(s.input_ids) for s in row) or PAD_MULTIPLE for row in rows]
    length = -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE
    batch_size = len(rows)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros(batch_size, length, dtype=torch.bool)
    seq_ids = torch.full((batch_size, length), -1, dtype=torch.long)
    position_ids = torch.zeros(3, batch_size, length, dtype=torch.long)
    segments: list[int] = []
    pixel_values: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for b, row in enumerate(rows):
        cursor = 0
        if not row:
            seq_ids[b, :PAD_MULTIPLE] = 0
            position_ids[:, b, :PAD_MULTIPLE] = torch.arange(PAD_MULTIPLE)
            segments.append(PAD_MULTIPLE)
            cursor = PAD_MULTIPLE
        for j, sample in enumerate(row):
            n = len(sample.input_ids)
            input_ids[b, cursor : cursor + n] = sample.input_ids
            answer_mask[b, cursor : cursor + n] = sample.answer_mask
            seq_ids[b, cursor : cursor + n] = j
            position_ids[:, b, cursor : cursor + n] = sample.position_ids
            segments.append(n)
            cursor += n
            if sample.pixel_values is not None and sample.image_grid_thw is not None:
                pixel_values.append(sample.pixel_values)
                grids.append(sample.image_grid_thw)
        if cursor < length:
            segments.append(length - cursor)  # the padding tail attends only to itself
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=input_ids,
        answer_mask=answer_mask,
        seq_ids=seq_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(segments),
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        keys=[[s.key for s in row] for row in rows],
        num_answer_tokens=int(answer_mask.sum()),
    )
