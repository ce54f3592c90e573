"""Atomic checkpoints, resume and the trainer state (docs/DESIGN.md §6).

Layout of ``OUTPUT_DIR/checkpoints/``::

    step-00000010/            one checkpoint (a DeepSpeed tag)
      <DeepSpeed engine files>  model/optimizer/scheduler shards, written by every rank
      trainable.safetensors     the trainable weights (LoRA + mask row, or the whole LM), gathered
      mdlm_generation.json      how the model reads its input and decodes (trainer.run.run_settings)
      trainer_state.json        written LAST by rank 0: the commit record (step, data position,
                                config hash, manifest of every file with its size)
      universal/                the engine state in DeepSpeed's world-size-free format, made
                                when a run first resumes from this checkpoint at another world size
    latest                      pointer to the newest committed tag (DeepSpeed's own format)

A checkpoint counts only once ``trainer_state.json`` exists and every file in its manifest has the
recorded size, so a crash anywhere mid-save leaves the previous checkpoint as the one resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from data_tools.fileio import atomic_write_text, file_sha256, fsync_dir, fsync_file
from trainer.run.run_settings import write_settings

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
POINTER_FILE = "latest"
UNIVERSAL_DIR = "universal"
TAG_RE = re.compile(r"^step-(\d{8})$")


class ResumeError(ValueError):
    """A resume was asked for and cannot be satisfied (one-line message)."""


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    """``OUTPUT_DIR/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    """The checkpoint directory name of an optimizer step."""
    return f"step-{step:08d}"


def _manifest(ckpt_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(ckpt_dir)): p.stat().st_size
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != STATE_FILE and not p.name.startswith(".")
    }


def read_state(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The trainer state of a committed, intact checkpoint; None if half-written or damaged."""
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    manifest = state.get("manifest")
    if not isinstance(manifest, dict) or not manifest:
        return None
    for rel, size in manifest.items():
        path = ckpt_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    return state


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint directories under ``root`` (committed or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(dirs, key=lambda p: int(TAG_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_valid(root: str | os.PathLike[str], verify: bool = False) -> Path | None:
    """The checkpoint the ``latest`` pointer names when it is intact, else the newest committed,
    intact one under ``root`` (half-written ones are skipped). With ``verify`` the trained weights'
    checksum is checked too; a checkpoint that fails is skipped with a warning."""
    root = Path(root)
    try:
        pointed: Path | None = root / (root / POINTER_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        pointed = None
    candidates = [c for c in reversed(list_checkpoints(root)) if c != pointed]
    if pointed is not None and TAG_RE.match(pointed.name):
        candidates.insert(0, pointed)
    for ckpt in candidates:
        state = read_state(ckpt)
        if state is None:
            continue
        if verify and not trained_state_intact(ckpt, state):
            print(
                f"checkpoint: warning: {ckpt} fails its checksum (trained weights changed on disk); "
                "using the previous one",
                file=sys.stderr,
            )
            continue
        return ckpt
    return None


def clear_run(output_dir: str | os.PathLike[str]) -> None:
    """Remove a previous run's checkpoints, metrics and TensorBoard logs (``--overwrite_output_dir``)."""
    out = Path(output_dir)
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


class RunLockError(ResumeError):
    """Another live run holds the output directory."""


class RunLock:
    """``OUTPUT_DIR/.run.lock``: one live run per output directory (taken by global rank 0).

    The file names its holder (host, pid). A lock whose process is gone on this host is stale and
    taken over; a lock from another host cannot be checked and must be removed by hand.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / ".run.lock"
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise RunLockError naming the holder."""
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunLockError(
                    f"{str(self.path.parent)!r} is in use by another run (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}); wait for it, use another --output_dir, or remove "
                    f"{str(self.path)!r} if that run is gone"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
            self.held = True
            return
        raise RunLockError(f"could not take {str(self.path)!r}; another run started at the same time")

    def _holder(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Give the lock back (only the holder does)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_resume(output_dir: str | os.PathLike[str], resume: str) -> Path | None:
    """Resolve ``checkpoint.resume``: "" -> None, "auto" -> newest in output_dir, or a path.

    A path may name one checkpoint or a directory of them (a run directory or its ``checkpoints``).
    An asked-for resume that finds nothing is an error (``ResumeError``), never a silent fresh start.
    """
    if not resume:
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        found = latest_valid(root, verify=True)
        if found is None:
            raise ResumeError(
                f"--resume auto found no committed checkpoint in {str(root)!r}; drop --resume to start fresh"
            )
        return found
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"--resume {resume!r} does not exist; pass a checkpoint directory or 'auto'")
    if (path / STATE_FILE).exists():
        state = read_state(path)
        if state is None or not trained_state_intact(path, state):
            raise ResumeError(
                f"--resume {resume!r} is a damaged or half-written checkpoint; pass an earlier one or 'auto'"
            )
        return path
    for root in (path, checkpoint_root(path)):
        found = latest_valid(root, verify=True)
        if found is not None:
            return found
    raise ResumeError(
        f"--resume {resume!r} holds no committed checkpoint; pass a checkpoint directory or 'auto'"
    )


def trained_state_intact(ckpt_dir: Path, state: dict[str, Any]) -> bool:
    """The trained weights still have the checksum recorded at commit (older records have none)."""
    expected = state.get("trainable_sha256")
    return expected is None or file_sha256(ckpt_dir / WEIGHTS_FILE) == expected


def commit(root: str | os.PathLike[str], tag: str, state: dict[str, Any], keep_last: int = 0) -> Path:
    """Rank 0, after every rank has written its files: record the state, move the pointer, prune.

    ``trainer_state.json`` is the commit record (written last, atomically, with a manifest of the
    files and their sizes); then the ``latest`` pointer moves; then old checkpoints beyond
    ``keep_last`` and abandoned half-written ones are removed.
    """
    root = Path(root)
    ckpt_dir = root / tag
    manifest = _manifest(ckpt_dir)
    # Everything the record lists is on disk before the record exists (a power cut must not leave a
    # commit record over files still in the page cache).
    for rel in manifest:
        fsync_file(ckpt_dir / rel)
    for folder in {(ckpt_dir / rel).parent for rel in manifest}:
        fsync_dir(folder)
    state = {**state, "tag": tag, "manifest": manifest}
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        state["trainable_sha256"] = file_sha256(ckpt_dir / WEIGHTS_FILE)
    atomic_write_text(ckpt_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    atomic_write_text(root / POINTER_FILE, tag)
    prune(root, keep_last, newest=ckpt_dir)
    return ckpt_dir


def prune(root: Path, keep_last: int, newest: Path) -> None:
    """Delete committed checkpoints beyond the newest ``keep_last`` and uncommitted ones older than ``newest``."""
    newest_step = int(TAG_RE.match(newest.name).group(1))  # type: ignore[union-attr]
    committed = [p for p in list_checkpoints(root) if read_state(p) is not None]
    doomed: list[Path] = committed[:-keep_last] if keep_last > 0 else []
    doomed += [
        p
        for p in list_checkpoints(root)
        if read_state(p) is None and int(TAG_RE.match(p.name).group(1)) < newest_step  # type: ignore[union-attr]
    ]
    for path in doomed:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Engine side (every rank)


def keep_frozen_weights_out_of_state_dict(module: torch.nn.Module) -> None:
    """Make ``module.state_dict()`` (what DeepSpeed saves as the module) list trained tensors only.

    DeepSpeed's ``exclude_frozen_parameters`` drops frozen parameters by their first name only, so a
    tied alias (the LM head sharing the frozen embedding) would still be saved whole; this drops
    every name of every frozen parameter. Loading is then non-strict: the frozen weights come from
    the base model the run is rebuilt from.
    """
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop_frozen(_: torch.nn.Module, state_dict: dict[str, Any], prefix: str, __: Any) -> None:
        for name in frozen:
            state_dict.pop(prefix + name, None)

    module.register_state_dict_post_hook(drop_frozen)


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that training changes, by name."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def gather_trainable_state(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """Full copies (CPU, fp32) of the trainable weights; every rank must call it (ZeRO-3 gathers)."""
    params = trainable_parameters(module)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {name: p.detach().to("cpu", torch.float32).clone() for name, p in params}
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in params}


def save(
    engine: Any,
    output_dir: str | os.PathLike[str],
    step: int,
    state: dict[str, Any],
    keep_last: int,
    zero3: bool,
    is_main: bool,
    generation_settings: dict[str, Any] | None = None,
) -> Path:
    """Save a checkpoint from every rank; returns its directory once it is committed everywhere.

    ``generation_settings`` (rank 0's; :func:`trainer.run.run_settings.generation_settings`) go into the
    checkpoint as ``mdlm_generation.json``, listed in its manifest like the weights."""
    from safetensors.torch import save_file

    from trainer.run.distributed import barrier

    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    started = time.perf_counter()
    # Our own pointer is moved only after the commit record exists: DeepSpeed must not write it.
    # Frozen weights are not saved again (the run rebuilds them from the base model; docs/DESIGN.md
    # §6): a checkpoint then holds what training changes, small enough to commit in a SIGTERM's
    # grace time.
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    weights = gather_trainable_state(engine.module, zero3)
    if is_main:
        tmp = root / tag / f".{WEIGHTS_FILE}.tmp"
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, root / tag / WEIGHTS_FILE)
        if generation_settings is not None:
            write_settings(root / tag, generation_settings)
    # Every rank's DeepSpeed shards must be on disk before rank 0 commits.
    barrier()
    if is_main:
        commit(root, tag, {**state, "save_seconds": round(time.perf_counter() - started, 3)}, keep_last)
    # Nobody proceeds (or exits) before the commit: a later crash must find this checkpoint.
    barrier()
    return root / tag


def load(engine: Any, ckpt_dir: str | os.PathLike[str], is_main: bool) -> dict[str, Any]:
    """Load engine, optimizer and scheduler state from a committed checkpoint; return the trainer state.

    A checkpoint written at another data-parallel world size is loaded through DeepSpeed's universal
    checkpoint (the engine must have been built with ``checkpoint.load_universal``; see
    :func:`needs_universal`): rank 0 converts it once into ``CKPT/universal/`` while the others wait.
    """
    from trainer.run.distributed import barrier

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    if state is None:
        raise ResumeError(f"checkpoint {str(ckpt_dir)!r} is damaged or half-written; pass an earlier one")
    load_dir, tag = ckpt_dir.parent, ckpt_dir.name
    if engine.load_universal_checkpoint():
        if is_main:
            convert_to_universal(ckpt_dir)
        # The converted files must exist before any rank reads them.
        barrier()
        load_dir, tag = ckpt_dir, UNIVERSAL_DIR
    # Not strict: the frozen weights are not in the checkpoint, they come from the base model.
    load_path, _ = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {str(ckpt_dir)!r}; pass an earlier checkpoint")
    release_gathered_parameters(engine)
    return state


def release_gathered_parameters(engine: Any) -> None:
    """Return a ZeRO-3 engine to the partition state of a fresh one (every parameter released).

    ZeRO-3 learns which parameters a module reads from other modules (PEFT's trainable-token delta,
    LoRA A weights read for their dtype) only by catching an access to a *released* parameter during
    the first forwards, and freezes its fetch trace after them. ``load_checkpoint`` ends by gathering
    the persistent (small) parameters, so a resumed run would record a trace without those reads;
    the next save releases them, the reads reappear and the frozen trace no longer matches
    ("tracing error ... parameter fetch queue"). See docs/CONTRACTS.md, ZeRO-3 resume.
    """
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        engine.empty_partition_cache()


def needs_universal(state: dict[str, Any], world_size: int) -> bool:
    """Whether a checkpoint's engine state must go through the universal format at ``world_size``.

    DeepSpeed partitions optimizer state (ZeRO-1/2/3) and parameters (ZeRO-3) by data-parallel rank,
    so its own files load only at the world size that wrote them.
    """
    return int(state.get("world_size", world_size)) != world_size


def convert_to_universal(ckpt_dir: Path) -> Path:
    """``CKPT/universal/``: the engine state of ``ckpt_dir`` in DeepSpeed's world-size-free format.

    Converted once (DeepSpeed's own ``ds_to_universal``) into a temporary folder that is renamed when
    complete, so an interrupted conversion is redone, never half-read.
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = ckpt_dir / UNIVERSAL_DIR
    if (out / "zero").is_dir():
        return out
    tmp = ckpt_dir / f".{UNIVERSAL_DIR}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ResumeError(
            f"converting {str(ckpt_dir)!r} for a resume at another world size failed ({exc}); "
            "resume with the world size that wrote it"
        ) from exc
    os.replace(tmp, out)
    fsync_dir(ckpt_dir)
    return out


def load_trainable_state(ckpt_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint without DeepSpeed (for export)."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ResumeError(f"{str(path)!r} is missing; pass a checkpoint directory written by this trainer")
    return load_file(str(path))
