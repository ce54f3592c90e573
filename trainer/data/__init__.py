"""The training-side data path: epoch plans from index.json, shard reading, packing, collation.

- `plan`: catalog of shard sets, weighted mixing, permutation, best-fit packing, global steps.
- `batch`: reading one sample by offset, checks, pixel values, `PackedBatch` collation.
- `loader`: `TrainLoader` (one item per global step, exact resume) and `EvalLoader`.
"""

from trainer.data.batch import LoadedSample, PackedBatch, SampleReader, collate_rows
from trainer.data.loader import EvalLoader, TrainLoader, TrainStep
from trainer.data.plan import (
    Catalog,
    EpochPlan,
    Packs,
    Planner,
    PlanSpec,
    SampleRef,
    best_fit_pack,
    load_catalog,
    parse_shard_spec,
    parse_shard_specs,
    plan_args,
)

__all__ = [
    "Catalog",
    "EpochPlan",
    "EvalLoader",
    "LoadedSample",
    "PackedBatch",
    "Packs",
    "PlanSpec",
    "Planner",
    "SampleReader",
    "SampleRef",
    "TrainLoader",
    "TrainStep",
    "best_fit_pack",
    "collate_rows",
    "load_catalog",
    "parse_shard_spec",
    "parse_shard_specs",
    "plan_args",
]
