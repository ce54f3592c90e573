"""TrainLoader / EvalLoader on real shards: exactly once, worker-independent order, collation, uint8
patches that the model's normaliser turns into the image processor's pixel values, corrupt bytes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from loader_shards import write_shard_set
from transformers import AutoTokenizer

from data_tools.index import read_index, read_table, shard_samples, write_index
from data_tools.shards import read_sample
from trainer.config import ModelConfig
from trainer.data import EvalLoader, PackedBatch, TrainLoader
from trainer.data import loader as loader_module
from trainer.model.attention import varlen_boundaries
from trainer.model.pixels import PixelNormaliser
from trainer.model.positions import mrope_position_ids
from trainer.model.processor import load_processor

MAX_TOKENS = 128
# Three uneven shards (7, 4, 10 samples); text-only, one-image and two-image samples; one too long.
LAYOUT = [
    [(5, []), (30, [(4, 4)]), (12, []), (60, []), (8, [(6, 4), (2, 2)]), (20, []), (3, [(2, 2)])],
    [(40, []), (400, []), (15, [(4, 2)]), (25, [])],
    [
        (10, []),
        (50, [(4, 4)]),
        (7, []),
        (35, []),
        (18, [(2, 4)]),
        (22, []),
        (9, []),
        (45, []),
        (4, []),
        (28, []),
    ],
]
TOO_LONG = "s01_001"


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path) -> Any:
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("loader-shards")
    write_shard_set(directory, AutoTokenizer.from_pretrained(tiny_model_dir), LAYOUT)
    return directory


def _loader(shard_dir: Path, processor: Any, **kwargs: Any) -> TrainLoader:
    settings: dict[str, Any] = dict(
        rank=0, world_size=2, micro_batch=1, grad_accum=2, max_tokens=MAX_TOKENS, seed=3, processor=processor,
        num_workers=2, max_epochs=1,
    )  # fmt: skip
    settings.update(kwargs)
    return TrainLoader([shard_dir], **settings)


def test_the_dry_run_plans_what_the_loop_s_loader_trains(shard_dir: Path, processor: Any) -> None:
    from trainer.config import load_config
    from trainer.data import PlanSpec
    from trainer.run.distributed import DistInfo
    from trainer.run.dry_run import config_plan
    from trainer.run.loop import build_train_loader

    overrides = {
        "model.name_or_path": str(shard_dir),
        "data.train": [f"{shard_dir}:0.5", f"{shard_dir}:1.5"],
        "data.max_tokens": MAX_TOKENS,
        "data.drop_remainder": True,
        "data.num_workers": 0,
        "seed": 5,
        "schedule.micro_batch_size": 1,
        "schedule.grad_accum_steps": 2,
    }
    config = load_config(None, overrides)
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    loader = build_train_loader(config, info, processor, None)
    assert loader.spec == PlanSpec.from_config(config, world_size=2)
    assert loader.spec.weights == (0.5, 1.5) and loader.spec.packs_per_step == 4
    catalog, plan = config_plan(config, world_size=2)  # what train --dry-run and `plan` report
    assert loader.plan_fingerprint == loader.spec.fingerprint(catalog)
    assert plan.packs == loader.plan(0).packs and plan.num_steps == loader.num_steps(0)


def test_a_changed_plan_is_refused_on_resume_unless_the_config_change_is_allowed(
    shard_dir: Path, processor: Any
) -> None:
    position = {
        **_loader(shard_dir, processor, num_workers=0, start_epoch=2).state(),
        "plan_fingerprint": "0" * 16,
    }
    with pytest.raises(ValueError, match=r"data plan changed .*checkpoint\.allow_config_change"):
        _loader(shard_dir, processor, num_workers=0, resume=position)
    loader = _loader(shard_dir, processor, num_workers=0, resume=position, allow_plan_change=True)
    assert (loader.state()["epoch"], loader.state()["step"]) == (2, 0)  # the saved position


def test_every_sample_once_per_epoch_on_two_ranks_with_two_workers(shard_dir: Path, processor: Any) -> None:
    all_keys = {s["key"] for s in read_table(shard_dir).entries()}
    seen: list[str] = []
    steps_per_rank = []
    for rank in range(2):
        loader = _loader(shard_dir, processor, rank=rank)
        items = list(loader)
        steps_per_rank.append([item.step for item in items])
        plan = loader.plan(0)
        for item in items:
            assert len(item.micro_batches) == 2 and all(len(mb.keys) == 1 for mb in item.micro_batches)
            # What the workers read is what the plan (and `python -m trainer plan`) says.
            expected = [loader.catalog.display_key(i) for p in plan.rank_packs(item.step, rank, 2) for i in p]
            assert item.keys == expected
            seen += item.keys
        assert loader.state()["epoch"] == 1 and loader.state()["step"] == 0
    assert steps_per_rank[0] == steps_per_rank[1] == list(range(plan.num_steps))
    remainder = [loader.catalog.display_key(i) for p in plan.remainder for i in p]
    assert plan.num_carried_in == 0 and len(remainder) > 0  # the layout leaves a carried-over tail
    assert Counter(seen + remainder) == Counter(all_keys - {TOO_LONG})
    assert plan.num_too_long == 1


def test_order_does_not_depend_on_num_workers(shard_dir: Path, processor: Any) -> None:
    def digest(num_workers: int) -> list[tuple[list[str], int, float]]:
        loader = _loader(shard_dir, processor, rank=1, num_workers=num_workers, max_epochs=2)
        out = []
        for item in loader:
            for mb in item.micro_batches:
                pixels = float(mb.pixel_values.sum()) if mb.pixel_values is not None else 0.0
                out.append((mb.keys[0], int(mb.input_ids.sum()), pixels))
        return out

    base = digest(0)
    assert len(base) > 4
    assert digest(3) == base


def test_workers_outlive_a_signal_to_the_job_and_end_when_the_loader_closes(
    shard_dir: Path, processor: Any
) -> None:
    """scancel, Kubernetes and Ctrl-C signal every process of the job, the loader's workers too: they
    ignore SIGTERM and SIGINT (the rank decides when to stop), every step still arrives in order, and
    closing the loader ends them. The signals come from another process, as a scheduler's do (torch's
    own worker handler exits quietly only when the parent sends SIGTERM)."""
    one_rank = dict(world_size=1, grad_accum=1, max_epochs=2)  # enough steps per epoch for two workers
    expected = [item.keys for item in _loader(shard_dir, processor, num_workers=0, **one_rank)]
    before = {p.pid for p in psutil.Process().children()}
    items = iter(_loader(shard_dir, processor, num_workers=2, **one_rank))
    keys = [next(items).keys]
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 2
    for name in ("TERM", "INT"):
        subprocess.run(["kill", "-s", name, *(str(w.pid) for w in workers)], check=True)
    time.sleep(0.5)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    keys.append(next(items).keys)
    assert keys == expected[:2]
    items.close()  # what the trainer does when it stops early
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive
    # A whole two-epoch pass with signals at every epoch's workers gives the unsignalled order.
    items = iter(_loader(shard_dir, processor, num_workers=2, **one_rank))
    keys = []
    for item in items:
        keys.append(item.keys)
        fresh = [p for p in psutil.Process().children() if p.pid not in before]
        subprocess.run(["kill", "-s", "TERM", *(str(w.pid) for w in fresh)], check=False)
    assert keys == expected


def test_workers_beyond_the_usable_cores_are_clamped_with_one_note(
    shard_dir: Path, processor: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One usable core, seen by the loader and by PyTorch's own worker-count check alike.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    loader_module._note_worker_clamp.cache_clear()
    expected = [item.keys for item in _loader(shard_dir, processor, num_workers=0, max_epochs=2)]
    with (
        caplog.at_level("WARNING", logger="trainer.data.loader"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        keys = [item.keys for item in _loader(shard_dir, processor, num_workers=3, max_epochs=2)]
    assert keys == expected
    # PyTorch warns "This DataLoader will create 3 worker processes ..." when given more than one.
    assert not [w for w in caught if "worker" in str(w.message)]
    notes = [r.getMessage() for r in caplog.records if "data.num_workers" in r.getMessage()]
    assert notes == ["data.num_workers 3 clamped to 1, the number of CPU cores this process may use"]


def test_epoch_two_starts_with_the_carried_remainder(shard_dir: Path, processor: Any) -> None:
    loader = _loader(shard_dir, processor, max_epochs=None, num_workers=0)
    first, second = loader.plan(0), loader.plan(1)
    assert second.num_carried_in == len(first.remainder) > 0
    assert second.packs[: second.num_carried_in] == first.remainder
    dropped = _loader(shard_dir, processor, drop_remainder=True, num_workers=0).plan(1)
    assert dropped.num_carried_in == 0


def _check_collation(batch: PackedBatch, shard_dir: Path, processor: Any) -> None:
    refs = {
        s["key"]: (shard_dir / shard["name"], s)
        for shard, samples in shard_samples(shard_dir)
        for s in samples
    }
    tokenizer = processor.tokenizer
    batch_size, length = batch.input_ids.shape
    assert length % 8 == 0 and batch.position_ids.shape == (3, batch_size, length)
    segments: list[int] = []
    grids: list[list[int]] = []
    for b, keys in enumerate(batch.keys):
        cursor = 0
        for j, key in enumerate(keys):
            path, entry = refs[key]
            sample = read_sample(path, entry["offset"], entry["num_bytes"])["json"]
            n = sample["num_tokens"]
            assert batch.seq_ids[b, cursor : cursor + n].eq(j).all()
            assert batch.input_ids[b, cursor : cursor + n].tolist() == sample["input_ids"]
            assert batch.answer_mask[b, cursor : cursor + n].tolist() == [
                bool(a) for a in sample["answer_mask"]
            ]
            alone = mrope_position_ids(
                torch.tensor(sample["input_ids"]),
                sample["image_grid_thw"] or None,
                spatial_merge_size=2,
                image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            )
            assert torch.equal(batch.position_ids[:, b, cursor : cursor + n], alone)
            grids += sample["image_grid_thw"]
            segments.append(n)
            cursor += n
        # Padding: pad ids, seq id -1, position ids 0, one segment of its own.
        assert batch.seq_ids[b, cursor:].eq(-1).all() and batch.position_ids[:, b, cursor:].eq(0).all()
        assert batch.input_ids[b, cursor:].eq(tokenizer.pad_token_id).all()
        if cursor < length:
            segments.append(length - cursor)
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [sum(segments[:i]) for i in range(len(segments) + 1)]
    assert batch.max_seqlen == max(segments)
    # The attention module derives the same boundaries from seq_ids alone.
    cu_seqlens, max_seqlen = varlen_boundaries(batch.seq_ids)
    assert torch.equal(cu_seqlens, batch.cu_seqlens) and max_seqlen == batch.max_seqlen
    assert batch.num_answer_tokens == int(batch.answer_mask.sum())
    if grids:
        assert batch.image_grid_thw is not None and batch.pixel_values is not None
        assert batch.image_grid_thw.tolist() == grids
        # One uint8 frame per patch: the model normalises and repeats it over T=2 on the device.
        assert batch.pixel_values.dtype == torch.uint8
        assert batch.pixel_values.shape == (sum(t * h * w for t, h, w in grids), 3 * 16 * 16)
    else:
        assert batch.pixel_values is None and batch.image_grid_thw is None


def test_collation_positions_per_sub_sequence_cu_seqlens_and_padding(shard_dir: Path, processor: Any) -> None:
    loader = _loader(shard_dir, processor, world_size=1, micro_batch=2, grad_accum=1, num_workers=0)
    num_multi, num_images = 0, 0
    for item in loader:
        (batch,) = item.micro_batches
        _check_collation(batch, shard_dir, processor)
        num_multi += sum(len(k) > 1 for k in batch.keys)
        num_images += 0 if batch.image_grid_thw is None else len(batch.image_grid_thw)
    assert num_multi > 0 and num_images > 0  # the checks covered packed rows and images


def test_pixel_values_are_the_stored_images_without_a_second_resize(shard_dir: Path, processor: Any) -> None:
    loader = _loader(
        shard_dir, processor, world_size=1, micro_batch=1, grad_accum=1, packing=False, num_workers=0
    )
    entry = next(s for s in read_table(shard_dir).entries() if len(s["image_grid_thw"]) == 2)
    for item in loader:
        (batch,) = item.micro_batches
        if batch.keys == [[entry["key"]]]:
            raw = read_sample(shard_dir / "shard-000000.tar", entry["offset"], entry["num_bytes"])
            # The stock call would resize these small images up to min_pixels; the loader must not.
            resized = processor.image_processor(images=raw["images"], return_tensors="pt")
            assert resized["image_grid_thw"].tolist() != entry["image_grid_thw"]
            assert batch.image_grid_thw.tolist() == entry["image_grid_thw"]
            # Patch 0 of image 0 is its top-left 16x16 block, channel-first; patch 1 the block right of it,
            # patch 2 the one below (2x2 merge blocks come whole).
            pixels = torch.from_numpy(np.array(raw["images"][0].convert("RGB")))
            for patch, (row, col) in enumerate([(0, 0), (0, 16), (16, 0)]):
                block = pixels[row : row + 16, col : col + 16].permute(2, 0, 1).reshape(-1)  # [C*16*16]
                assert torch.equal(batch.pixel_values[patch], block)
            return
    raise AssertionError("the two-image sample was not seen")


def test_normalised_patches_equal_the_image_processor_bit_for_bit(
    shard_dir: Path, processor: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Packed batches of PNG and JPEG samples (several grids, two images in one sample, several in a
    row): the normaliser's floats are exactly the image processor's for the same images."""
    jpeg_dir = tmp_path / "jpeg"
    layout = [[(6, [(2, 2)]), (4, [(4, 6), (2, 4)]), (9, [(6, 2)]), (3, []), (5, [(8, 4)])]]
    write_shard_set(jpeg_dir, AutoTokenizer.from_pretrained(tiny_model_dir), layout, "j", "jpg")
    loader = TrainLoader(
        [shard_dir, jpeg_dir], rank=0, world_size=1, micro_batch=2, grad_accum=1, max_tokens=MAX_TOKENS,
        seed=3, processor=processor, num_workers=0, max_epochs=1,
    )  # fmt: skip
    normaliser = PixelNormaliser(processor.image_processor)
    refs = {loader.catalog.display_key(i): loader.catalog.ref(i) for i in range(len(loader.catalog))}

    def images_of(key: str) -> list[Any]:
        ref = refs[key]
        return read_sample(ref.shard_path, ref.offset, ref.num_bytes)["images"]

    formats: set[str] = set()
    most_in_a_row = 0
    for item in loader:
        (batch,) = item.micro_batches
        if batch.pixel_values is None:
            continue
        images = []
        for keys in batch.keys:
            in_row = [image for key in keys for image in images_of(key)]
            most_in_a_row = max(most_in_a_row, len(in_row))
            images += in_row
        formats |= {image.format for image in images}
        expected = processor.image_processor(images=images, do_resize=False, return_tensors="pt")
        assert batch.image_grid_thw.tolist() == expected["image_grid_thw"].tolist()
        assert torch.equal(normaliser(batch.pixel_values), expected["pixel_values"])
    assert formats == {"PNG", "JPEG"} and most_in_a_row >= 2


def test_corrupt_samples_are_skipped_counted_logged_and_the_step_still_happens(
    shard_dir: Path, processor: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    table = read_table(broken)
    victim = table.shard_entries(2)[3]  # text only: break its JSON
    with open(broken / "shard-000002.tar", "r+b") as f:
        f.seek(victim["offset"] + 512)
        f.write(b"\xff\x00garbage" * 8)
    victim2 = table.shard_entries(0)[1]  # break its image: overwrite the PNG signature
    with open(broken / "shard-000000.tar", "r+b") as f:
        f.seek(victim2["offset"])
        png_at = f.read(victim2["num_bytes"]).index(b"\x89PNG")
        f.seek(victim2["offset"] + png_at)
        f.write(b"garbage!")
    clean = [item.keys for item in _loader(shard_dir, processor, world_size=1, packing=False, num_workers=0)]
    loader = _loader(broken, processor, world_size=1, packing=False, num_workers=2)
    items = list(loader)
    assert len(items) == len(clean)  # the step count does not change
    assert loader.num_skipped == Counter({"corrupt": 2})
    seen = [k for item in items for k in item.keys]
    assert victim["key"] not in seen and victim2["key"] not in seen
    assert len(seen) == sum(len(keys) for keys in clean) - 2
    hit = next(i for i, keys in enumerate(clean) if victim["key"] in keys)
    assert items[hit].skipped["corrupt"] >= 1
    # The row of the skipped sample (one sample per row here) became a dummy row with no targets.
    row = next(mb for mb in items[hit].micro_batches if mb.keys == [[]])
    assert row.num_answer_tokens == 0 and row.seq_ids[0, :8].eq(0).all()
    # Logged once per reason within the rate limit (here in-process, where caplog sees it).
    with caplog.at_level("WARNING", logger="trainer.data.batch"):
        in_process = _loader(broken, processor, world_size=1, packing=False, num_workers=0)
        assert [item.keys for item in in_process] == [item.keys for item in items]
    records = [r for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(records) == 1 and "corrupt" in records[0].getMessage()
    assert in_process.num_skipped == Counter({"corrupt": 2})


def test_sample_that_disagrees_with_the_index_is_skipped_as_mismatch(
    shard_dir: Path, processor: Any, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(shard_dir, edited)
    index = read_index(edited)
    table = read_table(edited, index)
    sample = int(table.shard_start[0]) + 1
    assert table.image_start[sample + 1] - table.image_start[sample] == 1  # one image
    grids = np.array(table.image_grid_thw)
    grids[table.image_start[sample]] = [1, 4, 6]  # the stored image is 4x4 patches
    write_index(edited, index, dataclasses.replace(table, image_grid_thw=grids))
    entry = table.shard_entries(0)[1]
    loader = _loader(edited, processor, world_size=1, packing=False, num_workers=0)
    keys = [k for item in loader for k in item.keys]
    assert entry["key"] not in keys and loader.num_skipped == Counter({"mismatch": 1})


def test_eval_loader_fixed_order_every_sample_once_equal_steps(shard_dir: Path, processor: Any) -> None:
    loaders = [
        EvalLoader(
            [shard_dir], rank=r, world_size=3, micro_batch=2, max_tokens=MAX_TOKENS, processor=processor
        )
        for r in range(3)
    ]
    batches = [list(loader) for loader in loaders]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(loaders[0])
    keys = [k for per_rank in batches for batch in per_rank for row in batch.keys for k in row]
    all_keys = [s["key"] for s in read_table(shard_dir).entries()]
    assert sorted(keys) == sorted(set(all_keys) - {TOO_LONG}) and loaders[0].num_too_long == 1
    assert any(
        batch.keys == [[]] and batch.num_answer_tokens == 0 for per_rank in batches for batch in per_rank
    )
    again = list(
        EvalLoader(
            [shard_dir], rank=1, world_size=3, micro_batch=2, max_tokens=MAX_TOKENS, processor=processor
        )
    )
    assert [b.keys for b in again] == [b.keys for b in batches[1]]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_rows_from_shards_equal_samples_one_by_one_in_the_tiny_model(
    shard_dir: Path, processor: Any, tiny_model_dir: Path, backend: str
) -> None:
    from trainer.data import SampleReader, collate_rows
    from trainer.model import build_mdlm_model

    model = build_mdlm_model(
        ModelConfig(str(tiny_model_dir), attn_implementation=backend), dtype=torch.float32
    )
    language = model.language.eval()
    loader = _loader(shard_dir, processor, world_size=1, micro_batch=2, grad_accum=1, num_workers=0)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def sub_sequences_with_images(batch: PackedBatch) -> int:
        rows, cols = torch.nonzero(batch.input_ids == image_id, as_tuple=True)
        return len(set(zip(rows.tolist(), batch.seq_ids[rows, cols].tolist(), strict=True)))

    # The micro-batch with images in the most sub-sequences (packed rows, several images).
    batch = max((item.micro_batches[0] for item in loader), key=sub_sequences_with_images)
    assert sub_sequences_with_images(batch) >= 2 and any(len(k) > 1 for k in batch.keys)
    with torch.no_grad():
        vision = model.vision_features(batch.pixel_values, batch.image_grid_thw)
        packed_BLH = language.hidden_states(
            batch.input_ids, batch.position_ids, batch.seq_ids, vision,
            cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
        )  # fmt: skip
    reader = SampleReader(processor)
    catalog = loader.catalog
    refs = {catalog.display_key(i): catalog.ref(i) for i in range(len(catalog))}
    num_compared = 0
    for b, keys in enumerate(batch.keys):
        for j, key in enumerate(keys):
            sample = reader.read(refs[key], key)
            assert sample is not None
            alone = collate_rows([[sample]], reader.pad_token_id)
            with torch.no_grad():
                alone_vision = (
                    model.vision_features(alone.pixel_values, alone.image_grid_thw)
                    if alone.pixel_values is not None
                    else None
                )
                alone_1LH = language.hidden_states(
                    alone.input_ids, alone.position_ids, alone.seq_ids, alone_vision
                )
            n = len(sample.input_ids)
            torch.testing.assert_close(
                packed_BLH[b][batch.seq_ids[b] == j], alone_1LH[0, :n], atol=2e-5, rtol=1e-4
            )
            num_compared += 1
    assert num_compared >= 3


def test_token_ids_outside_the_vocabulary_are_a_skip_reason(
    shard_dir: Path, processor: Any, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(shard_dir, edited)
    entry = read_table(edited).shard_entries(2)[3]
    with open(edited / "shard-000002.tar", "r+b") as f:
        f.seek(entry["offset"])
        raw = f.read(entry["num_bytes"])
        at = raw.index(b"151644")  # <|im_start|> in its input_ids
        f.seek(entry["offset"] + at)
        f.write(b"951644")  # same length: the JSON still parses, the id is past the vocabulary
    loader = _loader(edited, processor, world_size=1, packing=False, num_workers=0)
    keys = [k for item in loader for k in item.keys]
    assert entry["key"] not in keys
    assert loader.num_skipped == Counter({"token_out_of_range": 1})
    assert loader.num_skipped_where == Counter({"token_out_of_range shard-000002.tar": 1})


def test_image_in_a_format_off_the_allowlist_is_a_skip_reason(
    shard_dir: Path, processor: Any, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(shard_dir, edited)
    entry = read_table(edited).shard_entries(0)[1]
    with open(edited / "shard-000000.tar", "r+b") as f:
        f.seek(entry["offset"])
        png_at = f.read(entry["num_bytes"]).index(b"\x89PNG")
        f.seek(entry["offset"] + png_at)
        f.write(b"P6")  # a PPM signature: a format Pillow knows, refused like at build time
    loader = _loader(edited, processor, world_size=1, packing=False, num_workers=0)
    keys = [k for item in loader for k in item.keys]
    assert entry["key"] not in keys and loader.num_skipped == Counter({"image_format": 1})
