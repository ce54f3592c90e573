"""MDLM generation for Qwen3-VL: fill an answer canvas of `<|mask|>` tokens in a few denoising steps.

The answer canvas (`max_new_tokens` masks after the prompt's `<|im_start|>assistant\\n`) is cut into
blocks of `block_size` filled left to right (semi-autoregressive, as LLaDA). Every step runs the
bidirectional language model over prompt + canvas, predicts every still-masked position of the
current block (greedy, or sampled with a temperature) and commits the most confident predictions
(low-confidence remasking) or a random subset (random remasking); the rest stay masked. A row is
done once it has committed `<|im_end|>` and everything before it. The vision tower runs once per
call: its features are reused by every step.

`generate(model, prompts, config, tokens)` is the one function; evaluation calls it too.
`python -m trainer generate` wraps it (trainer/cli/generate.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from trainer.model.diffusion import logits_at_positions
from trainer.model.tokens import SpecialTokens
from trainer.run.run_settings import BLOCK_SIZE, FLAGS


@dataclass
class GenerationConfig:
    """How to fill the answer canvas."""

    max_new_tokens: int = 32
    """Answer canvas length in tokens (the answer plus its `<|im_end|>` must fit)."""
    steps: int = 32
    """Denoising steps in total, shared evenly between blocks; at least one per block."""
    block_size: int = BLOCK_SIZE
    """Semi-autoregressive block length; blocks are filled strictly left to right."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    """Which predictions to commit each step: the most confident ones, or a random subset."""
    temperature: float = 0.0
    """0 = greedy (argmax); > 0 samples from softmax(logits / temperature) with Gumbel noise."""
    seed: int = 0
    """Seed of the sampling / random-remasking generator (results are reproducible)."""
    stop_at_eos: bool = True
    """Stop a row once `<|im_end|>` and every token before it are committed."""
    padding_side: Literal["right", "left"] = "right"
    """Where padding goes in a batch of prompts of different lengths (pads get seq_id -1)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be at least 1")
        num_blocks = math.ceil(self.max_new_tokens / self.block_size)
        if self.steps < num_blocks:
            raise ValueError(
                f"steps={self.steps} is fewer than the {num_blocks} blocks of max_new_tokens="
                f"{self.max_new_tokens} / block_size={self.block_size}: raise --steps or --block-size"
            )
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r}: use 'low_confidence' or 'random'")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r}: use 'right' or 'left'")


def _built_in_flag(name: str) -> Any:
    """The built-in value of a flag a run's settings fill: ``GenerationConfig``'s default for a
    decoding field, off for ``shift``, else None (the pixel bounds: the processor's own)."""
    if name == "shift":
        return False
    return getattr(GenerationConfig, name, None)  # a dataclass field's default is a class attribute


RUN_FLAG_DEFAULTS: dict[str, Any] = {name: _built_in_flag(name) for name in FLAGS}
"""The built-in values of the flags a run's settings fill (:data:`trainer.run.run_settings.FLAGS`,
which owns the list)."""


@dataclass
class Prompt:
    """One request: a chat-formatted prompt and its images, already processed."""

    input_ids: list[int]
    """Prompt tokens, image pads expanded, ending with `<|im_start|>assistant\\n`."""
    pixel_values: torch.Tensor | None = None
    """[P, C*T*16*16] patches of this prompt's images (Qwen image processor output) or None."""
    image_grid_thw: torch.Tensor | None = None
    """[I, 3] grid of each image in 16-px patches, or None for a text-only prompt."""


@dataclass
class Generation:
    """The answer of one prompt."""

    token_ids: list[int]
    """Answer tokens before `<|im_end|>` (the whole canvas if it was never committed)."""
    commit_steps: list[int]
    """For each answer token, the (1-based) step at which it was committed."""
    finished: bool
    """True if `<|im_end|>` was committed (the answer ended inside the canvas)."""
    num_steps: int
    """Steps run for this row (fewer than `steps` when it stopped at `<|im_end|>`)."""
    eos_step: int | None = None
    """Step at which `<|im_end|>` was committed, or None."""
    text: str = ""
    """Decoded answer (filled by callers that hold a tokenizer)."""
    canvas: list[int] = field(default_factory=list)
    """The whole canvas at the end (masks left after `<|im_end|>` stay masks)."""
    canvas_steps: list[int] = field(default_factory=list)
    """Commit step of every canvas position (0 = never committed)."""


class MDLMModelLike(Protocol):
    """What generation needs of `trainer.model.MDLMModel`."""

    language: Any

    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any: ...


def _block_step_counts(config: GenerationConfig) -> list[int]:
    """Steps per block: `steps` spread evenly, the first blocks taking the remainder."""
    num_blocks = math.ceil(config.max_new_tokens / config.block_size)
    base, extra = divmod(config.steps, num_blocks)
    return [base + (1 if block < extra else 0) for block in range(num_blocks)]


def _position_ids(ids_L: torch.Tensor, grid_thw: torch.Tensor | None, tokens: SpecialTokens) -> torch.Tensor:
    from trainer.model.positions import mrope_position_ids

    return mrope_position_ids(
        ids_L,
        grid_thw,
        spatial_merge_size=tokens.spatial_merge_size,
        image_token_id=tokens.image,
        vision_start_token_id=tokens.vision_start,
    )


@torch.no_grad()
def generate(
    model: MDLMModelLike,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    tokens: SpecialTokens,
    *,
    shift: bool = False,
    language: nn.Module | None = None,
) -> list[Generation]:
    """Fill an answer canvas for each prompt (batched; rows never see each other).

    `shift=True` for models trained with the shifted objective (position i-1 predicts token i).
    `language` overrides `model.language` (e.g. a DeepSpeed engine wrapping it); it must return
    hidden states [B, L, H] and carry the `lm_head` of the model.
    """
    config.validate()
    if not prompts:
        return []
    language = model.language if language is None else language
    lm_head: nn.Module = model.language.lm_head
    device = next(model.language.parameters()).device
    num_rows, canvas_len = len(prompts), config.max_new_tokens

    input_ids_BL, seq_ids_BL, position_ids_3BL, canvas_start_B = _layout_rows(prompts, config, tokens)

    vision = _request_vision(model, prompts, device)
    input_ids_BL = input_ids_BL.to(device)
    seq_ids_BL = seq_ids_BL.to(device)
    position_ids_3BL = position_ids_3BL.to(device)
    canvas_start_B = canvas_start_B.to(device)
    canvas_idx_N = torch.arange(canvas_len, device=device)
    commit_step_BN = torch.zeros((num_rows, canvas_len), dtype=torch.long, device=device)
    # First committed <|im_end|> per row; canvas_len = none yet. Positions after it are never filled.
    eos_at_B = torch.full((num_rows,), canvas_len, dtype=torch.long, device=device)
    rows_B = torch.arange(num_rows, device=device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    steps_run_B = torch.zeros(num_rows, dtype=torch.long, device=device)

    step = 0
    for block, block_steps in enumerate(_block_step_counts(config)):
        lo, hi = block * config.block_size, min(canvas_len, (block + 1) * config.block_size)
        in_block_N = (canvas_idx_N >= lo) & (canvas_idx_N < hi)
        for block_step in range(block_steps):
            canvas_ids_BN = input_ids_BL[rows_B[:, None], canvas_start_B[:, None] + canvas_idx_N]
            limit_BN = canvas_idx_N[None, :] < (eos_at_B[:, None] if config.stop_at_eos else canvas_len)
            eligible_BN = (canvas_ids_BN == tokens.mask) & limit_BN & in_block_N[None, :]
            num_eligible_B = eligible_BN.sum(dim=1)
            if not bool(num_eligible_B.any()):
                break  # every row finished this block early (or stopped at <|im_end|>)
            step += 1
            active_B = (eligible_BN & limit_BN).any(dim=1)
            steps_run_B += active_B.long()

            hidden_BLH = language(input_ids_BL, position_ids_3BL, seq_ids_BL, vision)
            # Only positions still to fill need logits (the LM head is 151,936 wide): committed ones
            # and those after a row's <|im_end|> never change, so a large canvas costs what is left.
            block_pos_BK = canvas_start_B[:, None] + torch.arange(lo, hi, device=device)[None, :]
            eligible_BK = eligible_BN[:, lo:hi]
            eligible_BL = torch.zeros_like(seq_ids_BL, dtype=torch.bool)
            eligible_BL[rows_B[:, None], block_pos_BK] = eligible_BK
            logits_NV = logits_at_positions(
                hidden_BLH,
                eligible_BL,
                lm_head,
                mask_token_id=tokens.mask,
                shift=shift,
                seq_ids_BL=seq_ids_BL,
            )
            predicted_N, confidence_N = _predict(logits_NV, config, generator)
            # Back to [B, K] (both in row-major order): ineligible positions keep their id, never commit.
            predicted_BK = canvas_ids_BN[:, lo:hi].clone()
            predicted_BK[eligible_BK] = predicted_N
            if config.remasking == "random":
                confidence_BK = torch.rand(eligible_BK.shape, generator=generator).to(device)
            else:
                confidence_BK = torch.zeros(eligible_BK.shape, device=device)
                confidence_BK[eligible_BK] = confidence_N
            confidence_BK = confidence_BK.masked_fill(~eligible_BK, -math.inf)

            # Commit ceil(remaining / steps left) per row so the block is full after its last step.
            steps_left = block_steps - block_step
            num_commit_B = (num_eligible_B + steps_left - 1) // steps_left
            order_BK = confidence_BK.argsort(dim=1, descending=True, stable=True)
            rank_BK = order_BK.argsort(dim=1)
            commit_BK = (rank_BK < num_commit_B[:, None]) & eligible_BK

            new_ids_BK = torch.where(commit_BK, predicted_BK, canvas_ids_BN[:, lo:hi])
            input_ids_BL[rows_B[:, None], block_pos_BK] = new_ids_BK
            commit_step_BN[:, lo:hi] = torch.where(commit_BK, step, commit_step_BN[:, lo:hi])

            if config.stop_at_eos:
                is_eos_BK = commit_BK & (predicted_BK == tokens.eos)
                first_eos_B = torch.where(
                    is_eos_BK, torch.arange(lo, hi, device=device)[None, :], canvas_len
                ).amin(dim=1)
                eos_at_B = torch.minimum(eos_at_B, first_eos_B)

    canvas_BN = input_ids_BL[rows_B[:, None], canvas_start_B[:, None] + canvas_idx_N].cpu()
    eos_at = eos_at_B.tolist() if config.stop_at_eos else None
    return _collect(canvas_BN, commit_step_BN.cpu(), steps_run_B.tolist(), eos_at, tokens.eos)


def _request_vision(model: MDLMModelLike, prompts: Sequence[Prompt], device: torch.device) -> Any:
    """The vision tower runs once for the whole request; every denoising step reuses its features."""
    vision = None
    with_images = [p for p in prompts if p.image_grid_thw is not None and len(p.image_grid_thw)]
    if with_images:
        pixel_values = torch.cat([p.pixel_values for p in with_images]).to(device)  # type: ignore[misc]
        grid_thw = torch.cat([p.image_grid_thw for p in with_images]).to(device)  # type: ignore[misc]
        vision = model.vision_features(pixel_values, grid_thw)

    return vision


def _layout_rows(
    prompts: Sequence[Prompt], config: GenerationConfig, tokens: SpecialTokens
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row is prompt + a canvas of masks, padded to a common length (a multiple of 8, as
    PackedBatch): input ids [B, L], seq ids [B, L], M-RoPE position ids [3, B, L], canvas starts [B]."""
    num_rows, canvas_len = len(prompts), config.max_new_tokens
    row_lens = [len(p.input_ids) + canvas_len for p in prompts]
    seq_len = -(-max(row_lens) // 8) * 8
    input_ids_BL = torch.full((num_rows, seq_len), tokens.pad, dtype=torch.long)
    seq_ids_BL = torch.full((num_rows, seq_len), -1, dtype=torch.long)
    position_ids_3BL = torch.zeros((3, num_rows, seq_len), dtype=torch.long)
    canvas_start_B = torch.zeros(num_rows, dtype=torch.long)
    for row, (prompt, row_len) in enumerate(zip(prompts, row_lens, strict=True)):
        start = 0 if config.padding_side == "right" else seq_len - row_len
        ids_L = torch.tensor(list(prompt.input_ids) + [tokens.mask] * canvas_len, dtype=torch.long)
        input_ids_BL[row, start : start + row_len] = ids_L
        seq_ids_BL[row, start : start + row_len] = 0
        # M-RoPE ids depend only on where image tokens are, so masks in the canvas are plain text.
        position_ids_3BL[:, row, start : start + row_len] = _position_ids(
            ids_L, prompt.image_grid_thw, tokens
        )
        canvas_start_B[row] = start + len(prompt.input_ids)
    return input_ids_BL, seq_ids_BL, position_ids_3BL, canvas_start_B


def _collect(
    canvas_BN: torch.Tensor,
    commit_step_BN: torch.Tensor,
    steps_run: list[int],
    eos_at: list[int] | None,
    eos: int,
) -> list[Generation]:
    """One :class:`Generation` per row; ``eos_at`` (with stop_at_eos) is where each row stopped filling."""
    num_rows, canvas_len = canvas_BN.shape
    results = []
    for row in range(num_rows):
        canvas = canvas_BN[row].tolist()
        steps_row = commit_step_BN[row].tolist()
        # Without stop_at_eos the whole canvas is filled; the answer still ends at the first <|im_end|>.
        end = canvas.index(eos) if eos in canvas else canvas_len
        if eos_at is not None:
            end = min(end, int(eos_at[row]))
        finished = end < canvas_len
        results.append(
            Generation(
                token_ids=canvas[:end],
                commit_steps=steps_row[:end],
                finished=finished,
                num_steps=int(steps_run[row]),
                eos_step=steps_row[end] if finished else None,
                canvas=canvas,
                canvas_steps=steps_row,
            )
        )
    return results


def _predict(
    logits_NV: torch.Tensor, config: GenerationConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted token and its probability at each position (greedy or temperature sampling)."""
    if config.temperature <= 0:
        probs_NV = torch.softmax(logits_NV, dim=-1)
        confidence_N, predicted_N = probs_NV.max(dim=-1)
        return predicted_N, confidence_N
    scaled_NV = logits_NV.double() / config.temperature
    # Gumbel-max sampling in float64 (LLaDA: low precision Gumbel noise biases low-probability tokens).
    uniform_NV = torch.rand(scaled_NV.shape, generator=generator, dtype=torch.float64).to(scaled_NV.device)
    gumbel_NV = -torch.log((-torch.log(uniform_NV.clamp_min(1e-20))).clamp_min(1e-20))
    predicted_N = (scaled_NV + gumbel_NV).argmax(dim=-1)
    probs_NV = torch.softmax(scaled_NV, dim=-1)
    confidence_N = probs_NV.gather(-1, predicted_N[..., None]).squeeze(-1).float()
    return predicted_N, confidence_N


# ------------------------------------------------------------------------------------------------
# Prompts, model loading and the `generate` command


def build_prompt(processor: Any, question: str, images: Sequence[Any] = ()) -> Prompt:
    """A chat-formatted user turn (images first, then the question) + the assistant header.

    `processor` is a Qwen3-VL processor (`trainer.model.processor.load_processor`); images are PIL images,
    resized to the Qwen grid by its image processor. The text is encoded as the build encodes
    training samples (`data_tools.samples.encode_prompt`): a control-token string typed in the
    question is text, not structure.
    """
    from data_tools.samples import encode_prompt

    content: list[dict[str, str]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": question})
    grid = None
    pixel_values = None
    if images:
        encoded = processor.image_processor(images=list(images), return_tensors="pt")
        pixel_values, grid = encoded["pixel_values"], encoded["image_grid_thw"].long()
    merge = int(processor.image_processor.merge_size)
    num_tokens = [int(g.prod()) // merge**2 for g in grid] if grid is not None else []
    return Prompt(
        input_ids=encode_prompt(processor.tokenizer, [{"role": "user", "content": content}], num_tokens),
        pixel_values=pixel_values,
        image_grid_thw=grid,
    )


def load_model(
    model: str,
    *,
    adapter: str | None = None,
    checkpoint: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: torch.device | str | None = None,
) -> Any:
    """An `MDLMModel` for inference, in eval mode on `device` (`trainer.inference.loading.load_run` without
    the run settings).

    `model`: a Qwen3-VL folder or hub id (the base, or a merged export). `adapter`: an exported PEFT
    adapter folder (LoRA + the trained `<|mask|>` row), merged into the base weights. `checkpoint`:
    a trainer checkpoint directory (`OUTPUT_DIR/checkpoints/step-N`, or the run directory for its
    latest): the model is rebuilt as the run built it and its trained weights loaded.
    `dtype` "auto" = bfloat16 on GPU, float32 on CPU.
    """
    from trainer.inference.loading import load_run

    return load_run(
        model, adapter=adapter, checkpoint=checkpoint, dtype=dtype, attn_implementation=attn_implementation,
        device=device,
    )[0]  # fmt: skip


def decode_generations(tokenizer: Any, generations: Sequence[Generation]) -> None:
    """Fill `Generation.text` (special tokens dropped)."""
    for generation in generations:
        generation.text = tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
