"""Evaluation of a trained model on held-out shards: generation metrics and NELBO.

- generation metrics (exact match / ANLS / relaxed accuracy) and NELBO on a held-out shard set
  (`evaluate_shards`); a JSON report and a short table; per-task accuracy and chance for the
  synthetic demo shards. `python -m trainer evaluate` (trainer/cli/evaluate.py) wraps it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from trainer.config import DEFAULT_ACCURACY_T, DEFAULT_T_GRID
from trainer.inference.generate import GenerationConfig, Prompt, decode_generations, generate
from trainer.inference.scoring import METRICS, exact_match, score
from trainer.model.pixels import image_patches
from trainer.model.tokens import SpecialTokens
from trainer.run.nelbo import nelbo_eval

# ------------------------------------------------------------------------------------------------
# Generation metrics on held-out shards and the `evaluate` command

IMAGE_MODES: tuple[str, ...] = ("normal", "blank", "shuffled")
"""`normal`: the sample's own images. Controls: `blank` replaces every image with a white one of the
same size; `shuffled` gives each question another held-out sample's image (of the same size)."""


@dataclass
class EvalSample:
    """One held-out question with its reference answers."""

    key: str
    """Sample key."""
    prompt: Prompt
    """Prompt tokens (up to the first answer token) and processed images."""
    answers: list[str]
    """Reference answers (`meta.answers`, `meta.answer`, or the first assistant turn's text)."""
    task: str | None = None
    """`meta.task` (synthetic shards), else None."""
    chance: float | None = None
    """Chance accuracy of the task (from index.json "synth"), else None."""
    answer_ids: list[int] = field(default_factory=list)
    """The reference answer's tokens as stored (first answer span, without `<|im_end|>`)."""


def _image_tensors(image_processor: Any, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    # Shard images are already on the Qwen grid: resizing again would change their token count.
    processed = image_processor(images=list(images), do_resize=False, return_tensors="pt")
    return processed["pixel_values"], processed["image_grid_thw"].long()


def load_eval_samples(
    shard_dir: str | Path, processor: Any, *, limit: int = 0, eos_token_id: int
) -> tuple[list[EvalSample], dict[str, Any]]:
    """Read held-out samples of one shard set (the first `limit`, 0 = all) and its index.json."""
    from data_tools.index import read_index
    from data_tools.shards import read_sample
    from trainer.data import load_catalog

    index = read_index(Path(shard_dir))
    catalog = load_catalog([shard_dir], limit)
    synth_tasks = index.get("synth", {}).get("tasks", {})
    samples = []
    for ref in map(catalog.ref, range(len(catalog))):
        raw = read_sample(ref.shard_path, ref.offset, ref.num_bytes)
        sample = raw["json"]
        input_ids, answer_mask = sample["input_ids"], sample["answer_mask"]
        if 1 not in answer_mask:
            continue  # nothing to answer
        first = answer_mask.index(1)
        end = first
        while end < len(input_ids) and answer_mask[end] and input_ids[end] != eos_token_id:
            end += 1
        meta = sample.get("meta") or {}
        if meta.get("answers"):
            answers = [str(a) for a in meta["answers"]]
        elif meta.get("answer") is not None:
            answers = [str(meta["answer"])]
        else:
            answers = [processor.tokenizer.decode(input_ids[first:end], skip_special_tokens=True).strip()]
        pixel_values = grid_thw = None
        if raw["images"]:
            pixel_values, grid_thw = _image_tensors(processor.image_processor, raw["images"])
        task = meta.get("task")
        chance = synth_tasks.get(task, {}).get("chance") if task else None
        samples.append(
            EvalSample(
                key=ref.key,
                prompt=Prompt(input_ids[:first], pixel_values, grid_thw),
                answers=answers,
                task=task,
                chance=float(chance) if chance is not None else None,
                answer_ids=input_ids[first:end],
            )
        )
    if not samples:
        raise ValueError(f"{shard_dir}: no sample with an answer: pass a held-out shard set (e.g. DIR/test)")
    return samples, index


def _patches_per_image(grid_thw: torch.Tensor) -> list[int]:
    return [int(t * h * w) for t, h, w in grid_thw.tolist()]


class ImageSwapper:
    """Replaces images for the control evaluations, identically for generation and NELBO."""

    def __init__(self, mode: str, image_processor: Any, seed: int = 0) -> None:
        if mode not in IMAGE_MODES:
            raise ValueError(f"image mode {mode!r}: use one of {', '.join(IMAGE_MODES)}")
        self.mode, self.image_processor, self.seed = mode, image_processor, seed
        self._blank: dict[tuple[int, int, bool], torch.Tensor] = {}

    def blank(self, grid: tuple[int, int, int], patches: bool = False) -> torch.Tensor:
        """Pixel values of a white image on `grid` (16-px patches); with `patches` its uint8 patches,
        as the loader ships them."""
        from PIL import Image

        _, h, w = grid
        if (h, w, patches) not in self._blank:
            patch = int(self.image_processor.patch_size)
            white = Image.new("RGB", (w * patch, h * patch), (255, 255, 255))
            self._blank[(h, w, patches)] = (
                image_patches(white, patch, int(self.image_processor.merge_size))
                if patches
                else _image_tensors(self.image_processor, [white])[0]
            )
        return self._blank[(h, w, patches)]

    def swap(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """New pixel values for images [I] with grids `grid_thw`: blank, or each image replaced by
        another of the same grid (a seeded cyclic shift, so none keeps its own when it has a peer)."""
        if self.mode == "normal":
            return pixel_values
        pieces = list(pixel_values.split(_patches_per_image(grid_thw)))
        grids = [tuple(g) for g in grid_thw.tolist()]
        if self.mode == "blank":
            uint8 = pixel_values.dtype == torch.uint8  # a loader's batch: blanks in its form
            return torch.cat([self.blank(g, uint8) for g in grids])  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed)
        out = list(pieces)
        for grid in sorted(set(grids)):
            members = [i for i, g in enumerate(grids) if g == grid]
            order = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
            for j, target in enumerate(order):
                out[target] = pieces[order[(j + 1) % len(order)]]
        return torch.cat(out)

    def swap_samples(self, samples: list[EvalSample]) -> list[EvalSample]:
        """The samples with their images replaced (all samples' images swapped together)."""
        with_images = [s for s in samples if s.prompt.image_grid_thw is not None]
        if self.mode == "normal" or not with_images:
            return samples
        grid_thw = torch.cat([s.prompt.image_grid_thw for s in with_images])  # type: ignore[misc]
        swapped = self.swap(torch.cat([s.prompt.pixel_values for s in with_images]), grid_thw)  # type: ignore[misc]
        sizes = [sum(_patches_per_image(s.prompt.image_grid_thw)) for s in with_images]  # type: ignore[arg-type]
        new_pixels = iter(swapped.split(sizes))
        out = []
        for s in samples:
            if s.prompt.image_grid_thw is None:
                out.append(s)
                continue
            prompt = Prompt(s.prompt.input_ids, next(new_pixels), s.prompt.image_grid_thw)
            out.append(EvalSample(s.key, prompt, s.answers, s.task, s.chance, s.answer_ids))
        return out

    def swap_batch(self, batch: Any) -> Any:
        """A `PackedBatch` with its images replaced (within the batch for `shuffled`)."""
        if self.mode == "normal" or batch.pixel_values is None:
            return batch
        return replace(batch, pixel_values=self.swap(batch.pixel_values, batch.image_grid_thw))


def generation_eval(
    model: Any,
    samples: Sequence[EvalSample],
    config: GenerationConfig,
    *,
    metric: str = "exact_match",
    batch_size: int = 32,
    shift: bool = False,
) -> dict[str, Any]:
    """Generate an answer for every sample and score it with `metric` (see `trainer.inference.scoring`).

    Returns `{"metric", "score", "accuracy" (exact match, always), "num_samples", "chance" (mean
    over samples with a known chance, else None), "per_task": {task: {"accuracy", "score",
    "chance", "num_samples"}}, "predictions": [{"key", "prediction", "answers", "task", "score",
    "correct"}]}`.
    """
    tokens = SpecialTokens.from_tokenizer(model.tokenizer, model.config)
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        generations = generate(model, [s.prompt for s in chunk], config, tokens, shift=shift)
        decode_generations(model.tokenizer, generations)
        for sample, generation in zip(chunk, generations, strict=True):
            predictions.append(
                {
                    "key": sample.key,
                    "prediction": generation.text,
                    "answers": sample.answers,
                    "task": sample.task,
                    "chance": sample.chance,
                    "score": score(metric, generation.text, sample.answers),
                    "correct": exact_match(generation.text, sample.answers),
                }
            )
    per_task: dict[str, dict[str, Any]] = {}
    for task in sorted({p["task"] for p in predictions if p["task"] is not None}):
        rows = [p for p in predictions if p["task"] == task]
        per_task[task] = {
            "accuracy": sum(p["correct"] for p in rows) / len(rows),
            "score": sum(p["score"] for p in rows) / len(rows),
            "chance": rows[0]["chance"],
            "num_samples": len(rows),
        }
    chances = [p["chance"] for p in predictions if p["chance"] is not None]
    low_chance = [p for p in predictions if p["chance"] is not None and p["chance"] <= 0.25]
    return {
        "metric": metric,
        "score": sum(p["score"] for p in predictions) / len(predictions),
        "accuracy": sum(p["correct"] for p in predictions) / len(predictions),
        "num_samples": len(predictions),
        "chance": sum(chances) / len(chances) if chances else None,
        "accuracy_chance_le_0.25": (sum(p["correct"] for p in low_chance) / len(low_chance))
        if low_chance
        else None,
        "per_task": per_task,
        "predictions": predictions,
    }


def choose_metric(metric: str, index: dict[str, Any]) -> str:
    """`auto` -> the metric the shard set's own build recorded (`data_tools build --metric`; a
    synthetic set is scored by exact match), else exact match with a note. Never guessed from a path."""
    if metric != "auto":
        if metric not in METRICS:
            raise ValueError(f"--metric {metric!r}: use auto or one of {', '.join(METRICS)}")
        return metric
    recorded = index.get("build", {}).get("metric") or ("exact_match" if "synth" in index else "")
    if recorded and recorded not in METRICS:
        raise ValueError(
            f"index.json records metric {recorded!r}, not one of {', '.join(METRICS)}: pass --metric"
        )
    if not recorded:
        print(
            "evaluate: note: the shard set records no metric, so exact match scores it; record one with "
            "`python -m data_tools build --metric anls|relaxed_accuracy|exact_match`, or pass --metric",
            file=sys.stderr,
        )
    return recorded or "exact_match"


def evaluate_shards(
    model: Any,
    shard_dir: str | Path,
    processor: Any,
    *,
    generation: GenerationConfig | None = None,
    metric: str = "auto",
    limit: int = 0,
    image_mode: str = "normal",
    with_nelbo: bool = True,
    batch_size: int = 32,
    max_tokens: int = 4096,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    accuracy_t: Sequence[float] = DEFAULT_ACCURACY_T,
    shift: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Generation metrics (and NELBO) of `model` on one held-out shard set, single process.

    `image_mode` "blank"/"shuffled" run the controls (the same swap is applied to the NELBO batches).
    """
    generation = generation or GenerationConfig(max_new_tokens=16, steps=16, block_size=16)
    tokens = SpecialTokens.from_tokenizer(model.tokenizer, model.config)
    samples, index = load_eval_samples(shard_dir, processor, limit=limit, eos_token_id=tokens.eos)
    swapper = ImageSwapper(image_mode, processor.image_processor, seed)
    chosen = choose_metric(metric, index)
    report = generation_eval(
        model, swapper.swap_samples(samples), generation, metric=chosen, batch_size=batch_size, shift=shift
    )
    report.update(
        {"data": str(shard_dir), "image_mode": image_mode, "generation": asdict(generation), "shift": shift}
    )
    report["nelbo"] = None
    if with_nelbo:
        from trainer.data import EvalLoader

        loader = EvalLoader(
            [shard_dir],
            rank=0,
            world_size=1,
            micro_batch=max(1, batch_size // 4),
            max_tokens=max_tokens,
            processor=processor,
            limit=limit,
        )
        batches = [swapper.swap_batch(batch) for batch in loader]
        report["nelbo"] = nelbo_eval(
            model,
            batches,
            mask_token_id=tokens.mask,
            t_grid=t_grid,
            accuracy_t=accuracy_t,
            shift=shift,
            seed=seed,
        )
    return report


def format_table(reports: dict[str, dict[str, Any]]) -> str:
    """A short text table: one row per named report (accuracy, metric score, chance, NELBO)."""
    lines = [f"{'':<16} {'accuracy':>9} {'score':>9} {'chance':>7} {'nelbo':>8} {'acc@t=1':>8}"]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, r in reports.items():
        nelbo = r.get("nelbo") or {}
        lines.append(
            f"{name:<16} {cell(r['accuracy']):>9} {cell(r['score']):>9} {cell(r.get('chance')):>7} "
            f"{cell(nelbo.get('nelbo')):>8} {cell(nelbo.get('masked_accuracy@1')):>8}"
        )
    for name, r in reports.items():
        for task, row in r.get("per_task", {}).items():
            lines.append(
                f"  {name}/{task:<20} {row['accuracy']:.3f} (chance {cell(row['chance'])}, n={row['num_samples']})"
            )
    return "\n".join(lines)


def note_image_size(shard_dir: Path, min_pixels: int | None, max_pixels: int | None) -> None:
    """Say so when the held-out images were sized otherwise than the model's input (shard images are
    used as stored: the model then sees another resolution than it trained on)."""
    from data_tools.index import read_index

    build = read_index(shard_dir).get("build", {})
    for name, wanted in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if wanted is not None and build.get(name) not in (None, wanted):
            print(
                f"evaluate: note: {shard_dir} was built with {name} {build[name]}, the model reads {wanted}",
                file=sys.stderr,
            )
