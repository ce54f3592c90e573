"""`python -m data_tools synth`: the synthetic demo dataset, written as shards exactly as `build` does.

Small images that a tiny random Qwen3-VL can learn to read in minutes on a CPU, and whose
questions cannot be answered without looking. Every answer is one word from a fixed list, so
chance accuracy is 1 / (number of choices). Tasks (`--tasks`, default `colour_en,colour_ko,
shape_en,shape_ko`):

| task        | image                          | question                          | answers (chance)                      |
| ----------- | ------------------------------ | --------------------------------- | ------------------------------------- |
| colour_en   | 64x64, one shape               | What colour is the shape?         | red green blue yellow purple orange (1/6) |
| colour_ko   | 64x64, one shape               | 도형은 무슨 색인가요?             | 빨강 초록 파랑 노랑 보라 주황 (1/6)   |
| shape_en    | 64x64, one shape               | What shape is it?                 | circle square triangle star (1/4)     |
| shape_ko    | 64x64, one shape               | 이 도형의 모양은 무엇인가요?      | 원 네모 세모 별 (1/4)                 |
| count_en    | 64x64, 1-4 small shapes        | How many shapes are there?        | one two three four (1/4)              |
| count_ko    | 64x64, 1-4 small shapes        | 도형이 몇 개 있나요?              | 하나 둘 셋 넷 (1/4)                   |
| label_en    | 128x64, a word (NanumGothic)   | What word is written?             | cat dog sun moon tree fish bird book (1/8) |
| label_ko    | 128x64, a word (NanumGothic)   | 무슨 글자가 쓰여 있나요?          | 고양이 강아지 해 달 나무 물고기 새 책 (1/8) |

A 64x64 image is 2x2 merged patches = 4 image tokens (128x64: 8), so the default pixel range is
min 4,096 / max 16,384 (images are never resized). Each sample JSON carries `"meta": {"task",
"answer", "choices", "lang"}`; `index.json` carries `"synth": {"tasks": {task: {"choices",
"chance"}}, ...}`. `DIR/train/` and `DIR/test/` are drawn from separate seeded streams.

From Python: `run_synth(DIR, MODEL, SynthSettings(num=N, ...))`.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from data_tools.build import run_build
from data_tools.errors import BuildError
from data_tools.report import SplitResult, summary_table
from data_tools.settings import BuildSettings, add_build_options, settings_from_args
from data_tools.sources import Source

SYNTH_MIN_PIXELS = 64 * 64
SYNTH_MAX_PIXELS = 128 * 128
IMAGE_SIZE = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
}
COLOURS_KO = {
    "red": "빨강",
    "green": "초록",
    "blue": "파랑",
    "yellow": "노랑",
    "purple": "보라",
    "orange": "주황",
}
SHAPES = ("circle", "square", "triangle", "star")
SHAPES_KO = {"circle": "원", "square": "네모", "triangle": "세모", "star": "별"}
COUNTS = ("one", "two", "three", "four")
COUNTS_KO = {"one": "하나", "two": "둘", "three": "셋", "four": "넷"}
LABELS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "book")
LABELS_KO = {
    "cat": "고양이",
    "dog": "강아지",
    "sun": "해",
    "moon": "달",
    "tree": "나무",
    "fish": "물고기",
    "bird": "새",
    "book": "책",
}


@dataclass(frozen=True)
class Task:
    """One question type: its language, question and answer list."""

    name: str
    kind: str
    lang: str
    question: str
    choices: tuple[str, ...]


def _tasks() -> dict[str, Task]:
    tasks = [
        Task("colour_en", "colour", "en", "What colour is the shape?", tuple(COLOURS)),
        Task("colour_ko", "colour", "ko", "도형은 무슨 색인가요?", tuple(COLOURS_KO[c] for c in COLOURS)),
        Task("shape_en", "shape", "en", "What shape is it?", SHAPES),
        Task("shape_ko", "shape", "ko", "이 도형의 모양은 무엇인가요?", tuple(SHAPES_KO[s] for s in SHAPES)),
        Task("count_en", "count", "en", "How many shapes are there?", COUNTS),
        Task("count_ko", "count", "ko", "도형이 몇 개 있나요?", tuple(COUNTS_KO[c] for c in COUNTS)),
        Task("label_en", "label", "en", "What word is written?", LABELS),
        Task("label_ko", "label", "ko", "무슨 글자가 쓰여 있나요?", tuple(LABELS_KO[w] for w in LABELS)),
    ]
    return {t.name: t for t in tasks}


TASKS = _tasks()
DEFAULT_TASKS = ("colour_en", "colour_ko", "shape_en", "shape_ko")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(shape)


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    grey = rng.randint(225, 255)
    return Image.new("RGB", size, (grey, grey, rng.randint(225, 255)))


def _jitter(rng: random.Random, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in colour)  # type: ignore[return-value]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=8)
def nanum_font(size: int) -> ImageFont.FreeTypeFont:
    """NanumGothic at `size` px, from the fonts koreanize-matplotlib ships (cached)."""
    import importlib.util

    # Found, not imported: importing koreanize_matplotlib would reconfigure matplotlib.
    spec = importlib.util.find_spec("koreanize_matplotlib")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0] if locations else ".") / "fonts" / "NanumGothic.ttf"
    if not path.is_file():
        raise BuildError(
            f"{path} is missing: the label tasks need koreanize-matplotlib (pip install koreanize-matplotlib)"
        )
    return ImageFont.truetype(str(path), size)


def render(task: Task, rng: random.Random) -> tuple[bytes, str]:
    """One image (PNG bytes) and its English answer key for `task`."""
    if task.kind in ("colour", "shape"):
        image = _background(rng, (IMAGE_SIZE, IMAGE_SIZE))
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        # Large and near the centre: the outline then falls on the same patches in every image, so
        # a tiny model's random vision features can tell the shapes apart within minutes.
        r = rng.uniform(20, 26)
        cx, cy = (IMAGE_SIZE / 2 + rng.uniform(-4, 4) for _ in range(2))
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, _jitter(rng, COLOURS[colour]))
        return _png(image), colour if task.kind == "colour" else shape
    if task.kind == "count":
        image = _background(rng, (IMAGE_SIZE, IMAGE_SIZE))
        n = rng.randint(1, 4)
        draw = ImageDraw.Draw(image)
        cells = rng.sample(range(4), n)  # one shape per quadrant: never overlapping
        for cell in cells:
            r = rng.uniform(6, 10)
            x0, y0 = (cell % 2) * 32, (cell // 2) * 32
            cx, cy = x0 + rng.uniform(r + 2, 30 - r), y0 + rng.uniform(r + 2, 30 - r)
            fill = _jitter(rng, COLOURS[rng.choice(list(COLOURS))])
            _draw_shape(draw, rng.choice(SHAPES), cx, cy, r, fill)
        return _png(image), COUNTS[n - 1]
    if task.kind == "label":
        word = rng.choice(LABELS)
        text = word if task.lang == "en" else LABELS_KO[word]
        image = _background(rng, (2 * IMAGE_SIZE, IMAGE_SIZE))
        draw = ImageDraw.Draw(image)
        font = nanum_font(rng.randint(22, 28))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = rng.uniform(2, max(2, 126 - (right - left))) - left
        y = rng.uniform(2, max(2, 62 - (bottom - top))) - top
        draw.text((x, y), text, font=font, fill=(rng.randint(0, 60),) * 3)
        return _png(image), word
    raise ValueError(task.kind)


def _answer(task: Task, key: str) -> str:
    table = {"colour": COLOURS_KO, "shape": SHAPES_KO, "count": COUNTS_KO, "label": LABELS_KO}[task.kind]
    return key if task.lang == "en" else table[key]


def make_rows(num: int, tasks: list[str], seed: int, split: str) -> list[dict[str, Any]]:
    """`num` records (messages + PNG bytes + meta), tasks in turn, from a stream seeded by (seed, split)."""
    rng = random.Random(f"synth:{seed}:{split}")
    rows = []
    for i in range(num):
        task = TASKS[tasks[i % len(tasks)]]
        image, key = render(task, rng)
        answer = _answer(task, key)
        rows.append(
            {
                "id": f"synth-{split}-{i:07d}",
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [image],
                "meta": {
                    "task": task.name,
                    "answer": answer,
                    "choices": list(task.choices),
                    "lang": task.lang,
                },
            }
        )
    return rows


def synth_index_block(tasks: list[str], seed: int, num_train: int, num_test: int) -> dict[str, Any]:
    """The `index.json` "synth" block: per task its choices and chance accuracy."""
    return {
        "synth": {
            "tasks": {
                t: {"choices": list(TASKS[t].choices), "chance": 1.0 / len(TASKS[t].choices)} for t in tasks
            },
            "seed": seed,
            "num_train": num_train,
            "num_test": num_test,
        }
    }


def _check_tasks(spec: str, names: list[str]) -> list[str]:
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise BuildError(f"--tasks {spec}: unknown task(s) {unknown}; choose from {', '.join(TASKS)} or all")
    return names


def parse_tasks(spec: str) -> list[str]:
    """`--tasks` value -> task names (`all`, or comma-separated names)."""
    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    return _check_tasks(spec, names)


def synth_build_settings(seed: int = 0) -> BuildSettings:
    """The build settings of the demo set (change one with `dataclasses.replace`).

    Images are never resized (64x64 and 128x64 lie inside the pixel range) and stored losslessly;
    answers are at most a few tokens, so a canvas of 8 (the demo's generation length) holds any."""
    return BuildSettings(
        min_pixels=SYNTH_MIN_PIXELS,
        max_pixels=SYNTH_MAX_PIXELS,
        image_format="png",
        samples_per_shard=500,
        seed=seed,
        metric="exact_match",
    )


@dataclass
class SynthSettings:
    """What `run_synth` renders (recorded in `index.json` "synth") and how it builds it."""

    num: int
    """Training samples (`DIR/train/`)."""
    num_test: int | None = None
    """Held-out samples (`DIR/test/`); None = max(60, num // 8)."""
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Task names (module docstring), drawn in turn."""
    build: BuildSettings = field(default_factory=synth_build_settings)
    """How the rows become shards; `build.seed` also seeds the rendered rows."""

    def validate(self) -> None:
        """Raise `BuildError` with a one-line message on impossible values."""
        _check_tasks(",".join(self.tasks), list(self.tasks))
        if self.num < 1:
            raise BuildError(f"--num {self.num}: must be >= 1")
        self.build.validate()

    @property
    def resolved_num_test(self) -> int:
        """`num_test`, or its default when None."""
        return self.num_test if self.num_test is not None else max(60, self.num // 8)


def run_synth(
    output: str | Path, model: str, settings: SynthSettings, workers: int = 1, progress: bool = True
) -> list[SplitResult]:
    """Render the rows and build `output/train/` and `output/test/`; returns the split results."""
    settings.validate()
    seed, num_test = settings.build.seed, settings.resolved_num_test
    tasks = list(settings.tasks)
    rows = {
        "train": make_rows(settings.num, tasks, seed, "train"),
        "test": make_rows(num_test, tasks, seed, "test"),
    }
    source = Source(spec="synth", container="synth", row_format="records", splits=rows, base_dir=None)
    return run_build(
        source,
        output,
        model,
        settings.build,
        workers,
        extra_index=synth_index_block(tasks, seed, settings.num, num_test),
        progress=progress,
        force_split_dirs=True,
    )


def synthesize(
    output: str | Path,
    model: str,
    num: int,
    num_test: int | None = None,
    tasks: list[str] | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    answer_padding: str | None = None,
) -> list[SplitResult]:
    """`run_synth` with the demo's build settings, from plain values (the demo pipeline's entry);
    `answer_padding` replaces the build's (`random`, `fixed`, `none`)."""
    build = synth_build_settings(seed)
    if answer_padding is not None:
        build = replace(build, answer_padding=answer_padding)
    settings = SynthSettings(num=num, num_test=num_test, tasks=tuple(tasks or DEFAULT_TASKS), build=build)
    return run_synth(output, model, settings, workers, progress)


def main(argv: list[str]) -> int:
    """`python -m data_tools synth --output DIR --num N --model PATH [--tasks ...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools synth",
        description="Render the synthetic demo dataset into DIR/train/ and DIR/test/ shard sets.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num", type=int, required=True, help="training samples")
    parser.add_argument(
        "--num-test", type=int, default=None, help="held-out samples (default: max(60, num // 8))"
    )
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks, or all")
    defaults = synth_build_settings()
    add_build_options(parser, defaults, pixels_from_model=False)
    args = parser.parse_args(argv)
    settings = SynthSettings(
        num=args.num,
        num_test=args.num_test,
        tasks=tuple(parse_tasks(args.tasks)),
        build=settings_from_args(args, defaults),
    )
    results = run_synth(args.output, args.model, settings, args.workers, progress=not args.no_progress)
    print(summary_table(results))
    return 0
