"""Run directories and checkpoints: atomic writes, clear errors on damaged files, and everything exact resume needs.

A run directory holds

    config.yaml                 the resolved run config
    checkpoints/last.pt         the latest training state (plus step-NNNNNNN.pt copies when asked for)
    samples/                    reconstruction / sample grids
    logs/                       TensorBoard events or scalars.csv
    <component>/                the exported model (config.json + model.safetensors) for later stages

A checkpoint is one `torch.save`d dict: the state dicts of the models, optimizers, schedulers and EMA, the step, the
RNG states and data position of every rank (so each rank continues its own stream), and the resolved config.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from muse.config import config_to_dict
from muse.train.common import Runtime

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or a run directory that cannot be resumed or started."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a half-written file under `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory (Windows), so it is best effort there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` onto the CPU; a truncated or corrupt file raises
    `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the file also holds numpy / python RNG states, and it is our own file.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a musegen training checkpoint")
    return state


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool, rt: Runtime) -> dict[str, Any] | None:
    """Create the run directory and return the checkpoint to resume from (None = start fresh).

    Without `resume`, a directory that already holds a checkpoint is refused rather than silently overwritten. With
    `resume` and no checkpoint yet, training starts fresh, so one command serves both the first launch and every
    restart of a preemptible job. The resolved config is (re)written as `config.yaml`.
    """
    last = checkpoint_dir(run_dir) / LAST
    if last.exists() and not resume:
        raise CheckpointError(f"{run_dir} already holds a checkpoint ({last}); pass --resume or choose another out_dir")
    state = load_checkpoint(last) if resume and last.exists() else None
    if state is not None and rt.is_main:
        changed = changed_keys(state["config"], config_to_dict(cfg))
        if changed:
            # Allowed (e.g. more steps, a new learning rate), but then the run is no longer one uninterrupted run.
            warnings.warn(f"resuming {last} with a changed config: {', '.join(changed)}", stacklevel=2)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda f: f.write(_config_yaml(cfg)))
    return state


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two plain config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [path for k in keys for path in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _config_yaml(cfg: Any) -> bytes:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # This process's device only: touching every GPU would create a context on each from every rank.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(obj: Any, rt: Runtime) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def per_rank(saved: list[Any], rt: Runtime, what: str) -> Any:
    """This rank's entry of a per-rank list saved in a checkpoint; a different world size cannot resume exactly."""
    if len(saved) != rt.world_size:
        raise CheckpointError(
            f"the checkpoint's {what} was saved by {len(saved)} process(es), this run has {rt.world_size}: "
            "resume with the same number of processes"
        )
    return saved[rt.rank]


def collect_state(step: int, components: dict[str, Any], batches: Any, cfg: Any, rt: Runtime) -> dict | None:
    """The training state after `step` steps; a collective (every rank's RNG and data position are gathered), and
    only rank 0 gets the dict (None elsewhere). `components` maps names to objects with `state_dict` (models,
    optimizers, schedulers, EMA), unwrapped from DDP."""
    rngs = gather(rng_state(), rt)
    positions = gather(batches.state_dict(), rt)
    if not rt.is_main:
        return None
    return {
        "step": step,
        "components": {name: obj.state_dict() for name, obj in components.items()},
        "rng": rngs,
        "data": positions,
        "world_size": rt.world_size,
        "config": config_to_dict(cfg),
    }


def restore_state(state: dict[str, Any], components: dict[str, Any], batches: Any, rt: Runtime) -> int:
    """Load a checkpoint into the components, the batch stream and this rank's RNGs; returns the step to continue
    from. Call it after every model is built, since building draws from the RNGs being restored."""
    missing = sorted(set(components) - set(state["components"]))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {missing} (saved: {sorted(state['components'])})")
    for name, obj in components.items():
        obj.load_state_dict(state["components"][name])
    batches.load_state_dict(per_rank(state["data"], rt, "data position"))
    set_rng_state(per_rank(state["rng"], rt, "RNG state"))
    return int(state["step"])


def write_checkpoint(run_dir: Path, state: dict[str, Any] | None, keep_every: int | None) -> None:
    """Write `last.pt` (rank 0 only: other ranks pass None) and, every `keep_every` steps, a kept copy
    `step-NNNNNNN.pt` that later saves do not overwrite."""
    if state is None:
        return
    directory = checkpoint_dir(run_dir)
    save_checkpoint(directory / LAST, state)
    if keep_every and state["step"] % keep_every == 0:
        save_checkpoint(directory / f"step-{state['step']:07d}.pt", state)


__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "prepare_run_dir",
    "rng_state",
    "set_rng_state",
    "gather",
    "per_rank",
    "collect_state",
    "restore_state",
    "write_checkpoint",
]
