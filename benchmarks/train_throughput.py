"""Training-step throughput: this trainer's MDLM step against the seed's path, side by side in one process.

    python benchmarks/train_throughput.py --small [--json OUT]                  # CPU, reduced shapes, < 2 min
    python benchmarks/train_throughput.py [--models 2B 8B] [--steps 5] [--json OUT]   # one CUDA device

On the lent GPU machine carry `.whl` from `bash ../shared/gpu/fetch_wheels.sh dashscope` (DeepSpeed, and the
wheel whose BPE ranks the offline Qwen tokenizer reads) and begin with the install line it prints.

Model: random weights of the published Qwen3-VL-2B / -8B shapes (`benchmarks/param_counts.py`), made on the
device in bf16; `--small`: `trainer.model.tiny.tiny_config` (text 64 x 4 layers, vision 64 x 2) in fp32, with the
real 151,936-row vocabulary so that the LM head weighs what it weighs in Qwen. Assembled by
`trainer.model.assemble_mdlm_model` with the trainer's defaults: bidirectional text attention, `<|mask|>`,
vision tower and mergers frozen, LoRA r16 on q/k/v/o plus the mask row; in train mode (LoRA dropout on).

Samples: document QA, one page each (a page of typed lines on the Qwen grid: 340-1,140 image tokens;
`--small`: 8-35), a question of random words and a short answer with the pad targets `data_tools build` adds
by default, tokenised by `data_tools.samples.tokenize_conversation` and made into the loader's `LoadedSample`
(uint8 patches, per-sample M-RoPE ids). They fill rows of at most `--max-tokens` in order; a step is one
micro-batch of `--rows` rows collated by `trainer.data.batch.collate_rows`. Three distinct steps are cycled.

ours: the trainer's step itself (`trainer.run.step.TrainStep`: noise drawn on the host; the frozen tower under no_grad outside
the engine; the engine forward with the loss at masked positions only: liger-kernel's fused linear CE where it
runs, else the chunked head; backward; optimizer step) on a DeepSpeed ZeRO-2 engine built by
`trainer.run.loop.build_engine` from the trainer's `ds_configs/zero2.json` (one process: NCCL on CUDA, gloo on
CPU). Its optimizer is the trainer's client torch AdamW on CUDA as on CPU: the JSON's DeepSpeed fused Adam
(a ~45 s JIT build on the GPU) is dropped; on LoRA's few million parameters both cost next to nothing.
Variants: eager and compiled (`MDLMModel.compile_language_layers`: inductor on CUDA; aot_eager on CPU, which
runs the compiled path but speeds nothing up) x packed attention backends: sdpa; flex on CUDA only (on CPU it
runs uncompiled, a dense reference); flash where flash-attn imports.

seed: the seed's path on the same weights, LoRA and engine: each sample alone in a row right-padded to
`--seed-len` tokens (4,096; `--small`: 192); the stock `Qwen3VLForConditionalGeneration` forward with causal
text attention (stock sdpa, padding masked) and the vision tower inside it (not under no_grad), logits over
the whole vocabulary at every position and Hugging Face's causal-LM loss on the answer tokens; `--seed-rows`
rows per micro-batch, accumulated into one optimizer step over the same samples as ours' step. Pixels reach
it as the image processor's floats (the seed's workers made them), ours as the loader's uint8 patches. The
tower and its mergers are frozen in both paths, so autograd records nothing in the tower either way: the
ratio shows the masked head and packing (no pad tokens), plus compilation and the attention kernels.

Timing: `--warmup` steps (compilation included), then `--steps` steps, each between two synchronisations of
the device; medians of the per-step rates.
- tokens/s: real (non-padding) tokens; both paths train the same samples in a step.
- MFU: model FLOPs of `trainer.run.flops.step_flops`, the formula the training log uses: per real token 4 x the
  language model's linear parameters (frozen base: forward 2N, activation gradients 2N; LoRA's own left out),
  attention 12 x layers x q_dim x the sum of squared document lengths (every pair, forward + backward), the
  LM head 4 x hidden x vocab per scored token, the frozen tower 2 x its parameters per patch (forward only).
  Scored tokens: the masked ones for ours, the answer tokens for the seed; the seed's pad positions and its
  head on unscored positions count as waste. MFU = FLOPs / step time / the device's dense bf16 peak
  (`trainer.run.flops.peak_flops`; none on CPU, where the model TFLOP/s column stands alone).
- peak memory above the weights: the variant's peak above what was allocated before its first step (the
  weights, LoRA master copies and optimizer state): `torch.cuda.max_memory_allocated` on CUDA; on CPU the
  peak resident set (`VmHWM`, reset through /proc/self/clear_refs after malloc_trim) above `VmRSS` before.
- x seed: tokens/s over the seed row's, same model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from param_counts import published_config
from PIL import Image, ImageDraw
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from data_tools.samples import tokenize_conversation
from data_tools.settings import BuildSettings
from trainer.config import TrainConfig, build_config, build_deepspeed_config
from trainer.data.batch import LoadedSample, PackedBatch, collate_rows
from trainer.model import MDLMModel, assemble_mdlm_model, attention, set_text_causal
from trainer.model.pixels import PixelNormaliser, image_patches
from trainer.model.positions import mrope_position_ids
from trainer.model.processor import build_image_processor
from trainer.model.tiny import tiny_config
from trainer.model.tokenizer import build_qwen_tokenizer
from trainer.run import distributed
from trainer.run.flops import FlopsModel, peak_flops, step_flops, sum_sq_doc_len
from trainer.run.loop import build_engine
from trainer.run.step import TrainStep

SMALL_SHAPE = {
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 192,
    "vision_hidden_size": 64,
    "vision_depth": 2,
    "vision_heads": 2,
}
"""`--small`'s model (`tiny_config` keywords): the whole run takes about 45 CPU-seconds, most of it the seed's
full-vocabulary head."""

MODELS = {"2B": "Qwen3-VL-2B", "8B": "Qwen3-VL-8B"}

WORDS = ["what", "is", "the", "total", "amount", "due", "on", "this", "invoice", "for", "the", "second", "quarter"]  # fmt: skip

NUM_DISTINCT_STEPS = 3
"""Steps of different packed lengths, cycled: the compiled layers see a new length in warm-up and run dynamic."""


@dataclass(frozen=True)
class Workload:
    """Sizes of the document samples and of a step."""

    page_blocks: tuple[int, int]
    """Page height in 32-px merge blocks (inclusive range); the width is 0.6-0.8 of the height."""
    question_words: tuple[int, int]
    max_tokens: int
    """Tokens of a packed row (ours)."""
    rows: int
    """Packed rows of a step (ours: one micro-batch)."""
    seed_len: int
    """The seed's row length: one sample a row, right-padded."""
    seed_rows: int
    """Rows of a seed micro-batch."""


@dataclass
class Row:
    """One line of the table."""

    model: str
    variant: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    model_tflops_per_s: float | None = None
    peak_above_weights_gib: float | None = None
    step_s: float | None = None
    tokens_per_step: float | None = None
    x_seed: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Samples and batches


def page_image() -> Image.Image:
    """A page of typed lines, drawn with PIL (the pixels do not change the cost of a step, and GPU images
    have no scikit-image for its scanned page)."""
    page = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(page)
    rng = np.random.default_rng(1)
    for y in range(80, 1680, 16):
        draw.text((90, y), " ".join(rng.choice(WORDS, 30)), fill="black")  # the default font: any Pillow
    return page


def document_samples(
    tokenizer: Any, model_config: Qwen3VLConfig, work: Workload, num: int
) -> list[LoadedSample]:
    """`num` document-QA samples as the loader hands them to `collate_rows`."""
    rng = np.random.default_rng(0)
    page = page_image()
    build = BuildSettings()  # the default answer padding of `data_tools build`
    patch = model_config.vision_config.patch_size
    merge = model_config.vision_config.spatial_merge_size
    samples = []
    for i in range(num):
        h = merge * int(rng.integers(work.page_blocks[0], work.page_blocks[1] + 1))
        w = max(merge, int(h * rng.uniform(0.6, 0.8)) // merge * merge)
        question = " ".join(rng.choice(WORDS, int(rng.integers(*work.question_words))))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": f"{int(rng.integers(1, 10**6))} won"}],
            },
        ]
        key = f"doc{i:05d}"
        tokens = tokenize_conversation(
            tokenizer, messages, [h * w // merge**2], padding=build.padding_for(key)
        )
        input_ids = torch.tensor(tokens.input_ids, dtype=torch.long)
        grid = torch.tensor([[1, h, w]], dtype=torch.long)
        positions = mrope_position_ids(
            input_ids, grid, spatial_merge_size=merge, image_token_id=model_config.image_token_id,
            vision_start_token_id=model_config.vision_start_token_id,
        )  # fmt: skip
        image = page.resize((patch * w, patch * h), Image.Resampling.BICUBIC)
        samples.append(
            LoadedSample(
                key, input_ids, torch.tensor(tokens.answer_mask, dtype=torch.bool), positions,
                image_patches(image, patch, merge), grid,
            )
        )  # fmt: skip
    return samples


def fill_rows(samples: list[LoadedSample], max_tokens: int) -> list[list[LoadedSample]]:
    """Samples in order into rows of at most `max_tokens` (the last, partly filled row dropped)."""
    rows: list[list[LoadedSample]] = [[]]
    used = 0
    for sample in samples:
        n = len(sample.input_ids)
        if n > max_tokens:
            raise ValueError(f"a sample of {n} tokens does not fit a row of {max_tokens}")
        if used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += n
    return rows[:-1]


@dataclass
class SeedBatch:
    """One micro-batch of the seed's path and its counts for the FLOPs formula."""

    inputs: dict[str, torch.Tensor]
    """Keyword arguments of the stock forward (host tensors)."""
    num_tokens: int
    sum_sq_doc_len: int
    num_answer_tokens: int
    num_patches: int


def seed_batch(samples: list[LoadedSample], seq_len: int, pad_id: int, image_token_id: int,
               normaliser: PixelNormaliser, pin: bool) -> SeedBatch:  # fmt: skip
    """`samples` one per row, right-padded to `seq_len`, as the seed's collator made them (`pin`: in
    pinned memory, as a CUDA loader hands them over)."""
    batch = collate_rows([[s] for s in samples], pad_id)
    pad = seq_len - batch.input_ids.shape[1]
    if pad < 0:
        raise ValueError(f"a sample of {batch.input_ids.shape[1]} tokens is longer than --seed-len {seq_len}")
    input_ids = F.pad(batch.input_ids, (0, pad), value=pad_id)
    answer = F.pad(batch.answer_mask, (0, pad))
    assert batch.pixel_values is not None and batch.image_grid_thw is not None
    inputs = {
        "input_ids": input_ids,
        "attention_mask": (F.pad(batch.seq_ids, (0, pad), value=-1) >= 0).long(),
        # The same ids as stock get_rope_index; passed, so the stock forward does not recompute them.
        "position_ids": F.pad(batch.position_ids, (0, pad)),
        "mm_token_type_ids": (input_ids == image_token_id).int(),  # required with images by transformers 5.17
        "labels": torch.where(answer, input_ids, -100),
        "pixel_values": normaliser(batch.pixel_values),
        "image_grid_thw": batch.image_grid_thw,
    }
    if pin:
        inputs = {key: value.pin_memory() for key, value in inputs.items()}
    return SeedBatch(
        inputs,
        batch.num_real_tokens,
        sum_sq_doc_len(batch.seq_ids),
        int(answer.sum()),
        len(batch.pixel_values),
    )


# ---------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory from now on above what is allocated now (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            # Heap memory the previous variant freed goes back to the system, or it would hide this peak.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = 1024 * status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def above_gib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = 1024 * status_kib("VmHWM")
        return (peak - self.base) / 2**30


def measure(
    row: Row, step: Callable[[int], tuple[float, float]], warmup: int, steps: int, device: torch.device,
    peak: float | None,
) -> None:  # fmt: skip
    """Fill `row` from `warmup` + `steps` calls of `step(i) -> (real tokens, model FLOPs)`."""
    memory = PeakMemory(device)
    for i in range(warmup):
        step(i)
    seconds, tokens, flops = [], [], []
    for i in range(warmup, warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        num_tokens, num_flops = step(i)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        tokens.append(num_tokens)
        flops.append(num_flops)
    row.tokens_per_s = statistics.median(n / s for n, s in zip(tokens, seconds, strict=True))
    row.model_tflops_per_s = statistics.median(f / s for f, s in zip(flops, seconds, strict=True)) / 1e12
    row.mfu = row.model_tflops_per_s * 1e12 / peak if peak else None
    row.step_s = statistics.median(seconds)
    row.tokens_per_step = statistics.mean(tokens)
    row.peak_above_weights_gib = memory.above_gib()


# ---------------------------------------------------------------------------------------------
# The model, the engine, the two paths


def random_model(qwen_config: Qwen3VLConfig, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                 tokenizer: Any, image_processor: Any) -> MDLMModel:  # fmt: skip
    """Random weights made on `device` in `dtype`, assembled as training assembles a loaded model."""
    torch.manual_seed(config.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = Qwen3VLForConditionalGeneration(qwen_config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = assemble_mdlm_model(base, tokenizer, config.model, config.lora, image_processor=image_processor)
    model.peft_model.train()
    return model


def step_runner(config: TrainConfig, info: distributed.DistInfo, model: MDLMModel, engine: Any) -> TrainStep:
    """The trainer's own step (`trainer.run.step.TrainStep`) over `engine`."""
    return TrainStep.for_model(config, info, model, engine)


def ours_step(runner: TrainStep, steps: list[PackedBatch]) -> Callable[[int], tuple[float, float]]:
    def step(i: int) -> tuple[float, float]:
        stats = runner([steps[i % len(steps)]], step=i)  # new noise each step, as the loop draws it
        return stats.num_tokens, stats.flops

    return step


def seed_step(model: MDLMModel, engine: Any, steps: list[list[SeedBatch]], fm: FlopsModel,
              device: torch.device) -> Callable[[int], tuple[float, float]]:  # fmt: skip
    def step(i: int) -> tuple[float, float]:
        micro_batches = steps[i % len(steps)]
        for index, mb in enumerate(micro_batches):
            # One optimizer step over the micro-batches (DeepSpeed's documented manual accumulation).
            engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            inputs = {key: value.to(device, non_blocking=True) for key, value in mb.inputs.items()}
            loss = model.peft_model(**inputs, use_cache=False).loss
            engine.backward(loss / len(micro_batches))
        engine.step()
        flops = sum(
            step_flops(fm, mb.num_tokens, mb.sum_sq_doc_len, mb.num_answer_tokens, mb.num_patches)
            for mb in micro_batches
        )
        return sum(mb.num_tokens for mb in micro_batches), flops

    return step


def make_steps(
    model: MDLMModel, tokenizer: Any, qwen_config: Qwen3VLConfig, work: Workload, cuda: bool
) -> tuple[list[PackedBatch], list[list[SeedBatch]], str]:
    """The distinct steps of ours and of the seed (the same samples), and a line that describes them."""
    pad_id = tokenizer.pad_token_id
    per_step = work.rows * NUM_DISTINCT_STEPS
    rows = fill_rows(document_samples(tokenizer, qwen_config, work, 12 * per_step), work.max_tokens)
    if len(rows) < per_step:
        raise ValueError(f"{len(rows)} packed rows, {per_step} needed: make more samples")
    normaliser = model.engine_module.pixel_normaliser
    assert normaliser is not None
    ours_steps, seed_steps = [], []
    for s in range(NUM_DISTINCT_STEPS):
        step_rows = rows[s * work.rows : (s + 1) * work.rows]
        batch = collate_rows(step_rows, pad_id)
        ours_steps.append(batch.pin_memory() if cuda else batch)  # the loader pins on CUDA
        samples = [sample for row in step_rows for sample in row]
        group = range(0, len(samples), work.seed_rows)
        image_id = qwen_config.image_token_id
        seed_steps.append(
            [
                seed_batch(samples[k : k + work.seed_rows], work.seed_len, pad_id, image_id, normaliser, cuda)
                for k in group
            ]
        )
    samples_per_row = sum(len(row) for row in rows[:per_step]) / per_step
    tokens = statistics.mean(batch.num_real_tokens for batch in ours_steps)
    seed_micro = statistics.mean(len(step) for step in seed_steps)
    line = (
        f"{samples_per_row:.1f} samples a packed row, {work.rows} rows a step, {tokens:,.0f} real tokens a step "
        f"(ours: one micro-batch; seed: {seed_micro:.1f} micro-batches of {work.seed_rows} x {work.seed_len})"
    )
    return ours_steps, seed_steps, line


def run_model(
    label: str, qwen_config: Qwen3VLConfig, args: argparse.Namespace, work: Workload,
    info: distributed.DistInfo, tokenizer: Any, image_processor: Any, emit: Callable[[Row], None],
) -> str:  # fmt: skip
    """Every variant on one model; returns a line that describes its steps."""
    device = info.device
    cuda = device.type == "cuda"
    config = build_config(None, {  # no data: nothing to validate against shards
        "deepspeed.config": "zero2", "schedule.micro_batch_size": work.rows, "schedule.grad_accum_steps": 1,
        "model.attn_implementation": "sdpa",
    })  # fmt: skip
    bf16 = cuda and torch.cuda.is_bf16_supported()
    ds_config = build_deepspeed_config(config, 1, cuda, bf16)
    ds_config.pop("optimizer", None)  # the client torch AdamW (module docstring)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = config.deepspeed.tf32
        torch.backends.cudnn.allow_tf32 = config.deepspeed.tf32
    torch._dynamo.reset()  # a fresh compile cache per model: the recompile limit counts per code object
    model = random_model(
        qwen_config, config, device, torch.bfloat16 if bf16 else torch.float32, tokenizer, image_processor
    )
    engine, _ = build_engine(config, ds_config, model, total_steps=10**6, warmup_steps=0)
    runner = step_runner(config, info, model, engine)
    peak = peak_flops(device, "bf16" if bf16 else "fp32")
    ours_steps, seed_steps, line = make_steps(model, tokenizer, qwen_config, work, cuda)
    results: list[Row] = []

    def run(variant: str, step: Callable[[int], tuple[float, float]]) -> None:
        row = Row(label, variant)
        try:
            measure(row, step, args.warmup, args.steps, device, peak)
        except torch.cuda.OutOfMemoryError:
            row.note = "out of memory"
            gc.collect()
            torch.cuda.empty_cache()
        results.append(row)
        emit(row)

    def ours(mode: str) -> None:
        for backend in args.backends:
            if backend in usable_backends(device):
                model.set_attention(backend)
                set_text_causal(model.base_model, False)
                run(f"ours {mode} {backend}", ours_step(runner, ours_steps))

    if "eager" in args.modes:
        ours("eager")
    # The seed before compiling: the stock forward goes through the same decoder layers.
    model.base_model.set_attn_implementation({"text_config": "sdpa"})
    set_text_causal(model.base_model, True)
    try:
        run(f"seed (causal, full-vocab loss, padded to {work.seed_len})",
            seed_step(model, engine, seed_steps, runner.flops, device))  # fmt: skip
    finally:
        engine.set_gradient_accumulation_boundary(True)  # ours: one micro-batch a step, always a boundary
    if "compiled" in args.modes:
        model.compile_language_layers(args.compile_backend)
        ours(f"compiled ({args.compile_backend})")

    seed = next(row for row in results if row.variant.startswith("seed"))
    for row in results:
        if row.tokens_per_s and seed.tokens_per_s:
            row.x_seed = row.tokens_per_s / seed.tokens_per_s
    engine.destroy()
    head = "liger fused linear CE" if runner.fused_ce else "chunked, checkpointed chunks"
    return f"{label}: {line}; ours' head: {head}"


def usable_backends(device: torch.device) -> list[str]:
    """The packed attention backends timed here: those `trainer.model.attention` can run on `device` but eager (no
    training backend) and flex off CUDA (uncompiled there: a dense reference, no speed to measure)."""
    cuda = device.type == "cuda"
    return [b for b in attention.available_backends(device) if b != "eager" and (b != "flex" or cuda)]


# ---------------------------------------------------------------------------------------------
# Output


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| model | variant | tokens/s | MFU | model TFLOP/s | peak above weights (GiB) | step (s) | x seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.variant} | {fmt(r.tokens_per_s, ',.0f')} | {fmt(r.mfu, '.1%')} | "
            f"{fmt(r.model_tflops_per_s, '.4g')} | {fmt(r.peak_above_weights_gib, '.2f')} | {fmt(r.step_s, '.3f')} | "
            f"{fmt(r.x_seed, '.2f')}{' ' + r.note if r.note else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="reduced shapes on the CPU (under 2 minutes)")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=["2B", "8B"], help="sizes (CUDA)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --small 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, new length)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--backends", nargs="+", choices=["sdpa", "flex", "flash"], default=["sdpa", "flex", "flash"],
                        help="packed attention backends of ours (those that cannot run here are skipped)")  # fmt: skip
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; --small aot_eager)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens of a packed row (4096; --small 384)"
    )
    parser.add_argument("--rows", type=int, default=None, help="packed rows a step (2; --small 1)")
    parser.add_argument(
        "--seed-len", type=int, default=None, help="the seed's padded row length (4096; --small 192)"
    )
    parser.add_argument("--seed-rows", type=int, default=2, help="rows of a seed micro-batch")
    parser.add_argument("--json", type=Path, help="also write the rows here (rewritten after every row)")
    args = parser.parse_args(argv)

    info = distributed.setup()
    if not args.small and info.device.type != "cuda":
        parser.error("the 2B/8B shapes need a CUDA device; use --small on a CPU")
    args.steps = args.steps or (3 if args.small else 5)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.small else "inductor")
    work = Workload(
        page_blocks=(4, 7) if args.small else (24, 38),
        question_words=(4, 24) if args.small else (8, 120),
        max_tokens=args.max_tokens or (384 if args.small else 4096),
        rows=args.rows or (1 if args.small else 2),
        seed_len=args.seed_len or (192 if args.small else 4096),
        seed_rows=args.seed_rows,
    )
    sizes = (
        {"small": tiny_config(**SMALL_SHAPE)}
        if args.small
        else {MODELS[m]: published_config(MODELS[m]) for m in args.models}
    )
    device_name = (
        torch.cuda.get_device_name(info.device)
        if info.device.type == "cuda"
        else platform.processor() or "CPU"
    )
    header = {
        "device": device_name, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "torch": torch.__version__, "transformers": version("transformers"), "deepspeed": version("deepspeed"),
        "compile_backend": args.compile_backend, "workload": asdict(work), "steps": args.steps, "warmup": args.warmup,
        "skipped_backends": [b for b in args.backends if b not in usable_backends(info.device)],
    }  # fmt: skip
    print(json.dumps(header), file=sys.stderr)
    tokenizer = build_qwen_tokenizer()
    image_processor = build_image_processor()
    all_rows: list[Row] = []

    def write_json() -> None:
        if args.json:
            args.json.write_text(json.dumps({**header, "rows": [asdict(r) for r in all_rows]}, indent=1))

    def emit(row: Row) -> None:
        """Each row as soon as it is measured: a run cut short keeps what it measured."""
        all_rows.append(row)
        print(
            f"  {row.model} {row.variant}: {fmt(row.tokens_per_s, ',.0f')} tokens/s {row.note}",
            file=sys.stderr,
        )
        write_json()

    lines = []
    for label, qwen_config in sizes.items():
        lines.append(run_model(label, qwen_config, args, work, info, tokenizer, image_processor, emit))
        write_json()  # again: the ratios to the seed row are known once a model is done
        gc.collect()
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(all_rows))
    print("\n".join(lines))
    if header["skipped_backends"]:
        print(
            f"not timed here: {', '.join(header['skipped_backends'])} (flex: CUDA only; flash: flash-attn on CUDA)"
        )
    # On a shared machine the wall time says more about the other jobs than about this run.
    print(f"CPU time of this run: {time.process_time():.0f} s")
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
