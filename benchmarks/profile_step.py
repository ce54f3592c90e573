"""Where the demo's CPU training step goes: torch.profiler over the trainer's own step.

    python benchmarks/profile_step.py [--work runs/profile] [--warmup 5] [--steps 20] [--rows 20]

Builds the `Trainer` of `configs/demo.yaml` in this process at world size 1 (one rank's share of the
demo's 2-rank step: the same micro-batch of rows of 256 tokens, less the gradient all-reduce) on the
demo's tiny model and synthetic shards (made under `--work` the first time, as `make demo` makes them),
runs `--warmup` steps, then profiles `--steps` steps of `trainer.run.step.TrainStep` (noise on the host,
the frozen tower, forward, masked loss, backward, the optimizer step) with the loader feeding them.

Prints the wall time per step and the data wait, then the `--rows` operators with the most self CPU
time (torch.profiler's table: where the time is spent, not who called it). Run it on an idle machine,
with OMP_NUM_THREADS=1 as the demo's ranks run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Parse the flags, make the demo's inputs when missing, profile the steps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/profile", help="folder of the tiny model, shards and run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=20, help="operators printed")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from data_tools.synth import SYNTH_MAX_PIXELS, SYNTH_MIN_PIXELS, synthesize
    from trainer.config import load_config
    from trainer.demo import DEMO_RECIPE, TINY_SHAPE, DemoConfig
    from trainer.model.tiny import make_tiny
    from trainer.run import distributed
    from trainer.run.loop import Trainer
    from trainer.run.preflight import prepare

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(args.work).resolve()
    demo = DemoConfig()
    model, shards = work / "tiny-model", work / "shards"
    if not (model / "config.json").exists():
        make_tiny(model, seed=0, min_pixels=SYNTH_MIN_PIXELS, max_pixels=SYNTH_MAX_PIXELS, **TINY_SHAPE)
    if not (shards / "test" / "index.json").exists():
        synthesize(
            shards, str(model), demo.num_train, demo.num_test, tasks=demo.tasks.split(","), progress=False
        )
    config = load_config(
        DEMO_RECIPE,
        {
            "output_dir": str(work / "run"), "model.name_or_path": str(model), "data.train": str(shards / "train"),
            "data.test": "", "checkpoint.overwrite_output_dir": True, "checkpoint.save_at_end": False,
            "logging.report_to": "none",
        },
    )  # fmt: skip
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(distributed.free_port())
    resume_dir, ds_config = prepare(config)
    info = distributed.setup(config.distributed.timeout_s)
    trainer = Trainer(config, ds_config, resume_dir, info)
    data = iter(trainer.loader)

    def steps(count: int, first: int) -> tuple[float, float, float]:
        """Mean wall time per step, data wait per step, samples per step."""
        waited = samples = 0.0
        start = time.perf_counter()
        for step in range(first, first + count):
            wait = time.perf_counter()
            item = next(data)
            waited += time.perf_counter() - wait
            samples += trainer.train_step(item.micro_batches, step).num_samples
        return (time.perf_counter() - start) / count, waited / count, samples / count

    steps(args.warmup, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        per_step, waited, samples = steps(args.steps, args.warmup)
    print(
        f"demo step at world size 1, {torch.get_num_threads()} thread(s), profiled: {per_step * 1000:.0f} ms per "
        f"step ({samples:.1f} samples), data wait {waited * 1000:.1f} ms"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    distributed.teardown()


if __name__ == "__main__":
    main()
