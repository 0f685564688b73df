"""The run directory: what a training run writes, and how it starts, resumes and is saved.

    config.yaml                   the resolved run config
    checkpoints/last.json         names the newest complete checkpoint: {"format", "step", "dir"}
    checkpoints/step-NNNNNNN/     one checkpoint: a `torch.distributed.checkpoint` directory (each rank writes its
                                  shards of the weights, EMA and optimizer state; `.metadata`) + `trainer.pt` (step,
                                  schedulers, every rank's RNG and data position, config) + `kept` (--keep-every)
    samples/  logs/  <component>/ grids, scalars, and the exported model (config.json + model.safetensors)

One format, whatever `train.parallel` and however many processes: under ddp the ranks hold the same tensors and
torch.distributed.checkpoint writes each once; under fsdp each rank writes its shards, so no process ever holds the
whole state. It is written atomically: into `step-N.tmp/`, renamed to `step-N/` once every rank's shards and
`trainer.pt` are on disk, and only then named by `last.json` (itself replaced atomically); the previous directory is
deleted after that. A crash at any point leaves the old checkpoint or the new one.

It resumes exactly on the same number of processes, in either mode, and on any other number (the tensors are
resharded to the new layout; the data continues from the same sample of the epoch, and the random streams are
reseeded). A run may switch between ddp and fsdp at a resume.

Legacy: musegen up to d178d65 wrote `checkpoints/last.pt` under ddp (the whole state, one `torch.save`d file by rank
0). Such a file is still found and resumes exactly, under ddp or fsdp (each rank then takes its shard of every tensor):
it is read once, and the first checkpoint the resumed run saves replaces it. Kept copies `step-NNNNNNN.pt` are left
alone. `read_checkpoint` reads either kind whole, in one process.

    saved = prepare_run_dir(run_dir, cfg, resume, rt)          # before the model is built
    start_from_weights(model, cfg.train.init_from, "transformer")   # a fresh run from saved weights (fine-tuning)
    step = restore(saved, components, batches, cfg, rt) if saved else 0   # after every model is parallelized
    save_checkpoint(run_dir, step, components, batches, cfg, rt, keep_every)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from muse.config import config_to_dict
from muse.train.batches import BatchStream
from muse.train.ema import EMA
from muse.train.runtime import Runtime, barrier, gather, hash_seed, seed_everything, shard_like
from persist import atomic_write, atomic_write_bytes, atomic_write_json, fsync_dir, read_json_object
from persist.weights import load_component_weights, read_component_config

CHECKPOINT_DIR = "checkpoints"
LAST = "last.json"                # names the newest complete checkpoint directory
TRAINER_FILE = "trainer.pt"       # inside a checkpoint: everything but the tensors torch.distributed.checkpoint holds
KEPT_MARKER = "kept"              # inside a checkpoint: never deleted (--keep-every)
FORMAT = "musegen-sharded/1"      # the format name d178d65 gave its fsdp checkpoints, which are this format exactly
LEGACY_LAST = "last.pt"           # read only: the whole state in one file, as musegen up to d178d65 wrote it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or a run directory that cannot be resumed or started."""


@dataclass(frozen=True)
class Saved:
    """A checkpoint found in a run directory, to resume from."""

    path: Path            # a checkpoint directory checkpoints/step-NNNNNNN/, or a legacy checkpoints/last.pt
    state: dict           # the directory's trainer.pt (no tensors of the models), or last.pt's whole dict
    legacy: bool          # a last.pt: whole tensors, optimizers keyed by position


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


# ====================================================================================================================
# Files


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a `torch.save`d checkpoint file (a checkpoint's `trainer.pt`, or a legacy `last.pt`) onto the CPU; a
    truncated or corrupt file raises `CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the file also holds numpy / python RNG states, and it is our own file. mmap: the tensors
        # are read as they are used, and the processes of a node that all load one last.pt share its pages.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a musegen training checkpoint")
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of `run_dir`: the directory `last.json` names, else a legacy `last.pt`, else None.

    `last.json` wins when both exist: a legacy `last.pt` is removed right after the first save that replaces it, so
    the two coexist only when a crash fell between the two."""
    pointer = checkpoint_dir(run_dir) / LAST
    if not pointer.is_file():
        legacy = checkpoint_dir(run_dir) / LEGACY_LAST
        return legacy if legacy.is_file() else None
    try:
        name = read_json_object(pointer)["dir"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{pointer} is corrupt ({type(error).__name__}: {error})") from None
    path = checkpoint_dir(run_dir) / name
    if not (path / TRAINER_FILE).is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole training state of a checkpoint (a `step-NNNNNNN/` directory or a legacy `last.pt`), read in one
    process onto the CPU, to inspect or compare: {"step", "components", "rng", "data", "world_size", "config"}, every
    tensor whole. (Optimizers of a checkpoint directory are keyed by parameter name, a legacy file's by position.)"""
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = load_checkpoint(path / TRAINER_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "whole.pt")  # the public way to read every shard whole, one process
        tensors = torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=False)
    return {**state, "components": {**tensors, **state["components"]}}


# ====================================================================================================================
# Starting a run


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool, rt: Runtime) -> Saved | None:
    """Create the run directory and return the checkpoint to resume from (None = start fresh).

    Without `resume`, a directory that already holds a checkpoint is refused rather than silently overwritten. With
    `resume` and no checkpoint yet, training starts fresh, so one command serves the first launch and every restart
    of a preemptible job. The resolved config is (re)written as `config.yaml`.
    """
    path = latest_checkpoint(run_dir)
    if path is not None and not resume:
        raise CheckpointError(f"{run_dir} already holds a checkpoint ({path}); pass --resume or choose another "
                              "out_dir")
    saved = None
    if path is not None:
        legacy = path.name == LEGACY_LAST
        saved = Saved(path, load_checkpoint(path if legacy else path / TRAINER_FILE), legacy)
    if saved is not None and rt.is_main:
        changed = changed_keys(saved.state["config"], config_to_dict(cfg))
        if changed:
            # Allowed (e.g. more steps, a new learning rate), but then the run is no longer one uninterrupted run.
            warnings.warn(f"resuming {saved.path} with a changed config: {', '.join(changed)}", stacklevel=2)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir(run_dir).glob("*.tmp"):  # a save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_bytes(run_dir / "config.yaml", _config_yaml(cfg))
    barrier(rt)  # no rank writes a checkpoint before the stale ones are gone
    return saved


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two plain config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [path for k in keys for path in changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _config_yaml(cfg: Any) -> bytes:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()


def start_from_weights(model: nn.Module, path: str | Path, component: str) -> None:
    """Start `model` from the weights saved in `path` (`model.safetensors`, any float dtype): a model directory, or
    a training run directory (its exported `component/`), or a pipeline directory (its `component/`). Every tensor
    must exist with the same shape, else ValueError naming it. Only the weights are taken; optimiser, schedule and
    step start fresh, and settings without weights (dropout) come from the run's own config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"train.init_from {path} is not a directory")
    if not (path / "model.safetensors").is_file() and (path / component / "model.safetensors").is_file():
        path = path / component  # a run directory (its export) or a pipeline directory
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"train.init_from {path} holds no model.safetensors (nor {component}/ with one): "
                                "give a model directory, a run directory or a pipeline directory")
    try:
        _, digest = read_component_config(path)
        load_component_weights(path, model, digest)
    except ValueError as e:
        raise ValueError(f"train.init_from {path} does not fit this run's model ({e}); init_from needs a model of "
                         "the same architecture and size") from None


# ====================================================================================================================
# Saving


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


def save_checkpoint(run_dir: Path, step: int, components: dict[str, Any], batches: BatchStream, cfg: Any,
                    rt: Runtime, keep_every: int | None) -> None:
    """Write `checkpoints/step-NNNNNNN/` with the training state after `step` steps and point `last.json` at it; a
    collective (every rank calls it and writes its part). `components` maps names to objects with `state_dict` /
    `load_state_dict`: models (unwrapped from DDP), optimizers, schedulers and EMA. Every `keep_every` steps the
    checkpoint is kept for good. See the module docstring for why a crash cannot leave a half checkpoint behind."""
    import torch.distributed.checkpoint as dcp

    directory = checkpoint_dir(run_dir)
    dirname = f"step-{step:07d}"
    tmp, final = directory / f"{dirname}.tmp", directory / dirname
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    tensors = {name: _tensor_state(obj, components) for name, obj in components.items() if _has_tensors(obj)}
    rest = {name: obj.state_dict() for name, obj in components.items() if not _has_tensors(obj)}
    # Every rank writes its own shards (fsynced); rank 0 writes `.metadata` once all have finished.
    with _single_process_quietly(rt):
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not rt.distributed)
    rngs, positions = gather(rng_state(), rt), gather(batches.state_dict(), rt)
    if rt.is_main:
        trainer = {"format": FORMAT, "step": step, "components": rest, "rng": rngs, "data": positions,
                   "world_size": rt.world_size, "config": config_to_dict(cfg)}
        atomic_write(tmp / TRAINER_FILE, lambda file: torch.save(trainer, file))
        if keep_every and step % keep_every == 0:
            atomic_write_bytes(tmp / KEPT_MARKER, b"")
        previous = latest_checkpoint(run_dir)
        # `last.json` never names `final` here: saving step N again means the run resumed from an earlier checkpoint,
        # so a `step-N/` on disk is a leftover of the interrupted attempt.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(directory)
        atomic_write_json(directory / LAST, {"format": FORMAT, "step": step, "dir": dirname})
        if previous is not None and previous.name == LEGACY_LAST:
            previous.unlink()  # read once, now replaced: a later --resume cannot pick it
        elif previous is not None and previous != final and not (previous / KEPT_MARKER).exists():
            shutil.rmtree(previous)
    barrier(rt)


def _has_tensors(obj: Any) -> bool:
    """Whether `obj`'s state goes through torch.distributed.checkpoint (models, EMA, optimizers that have stepped)
    rather than into `trainer.pt` (schedulers, and an optimizer before its first step, such as the VQGAN
    discriminator's before `loss.disc_start_step`: it holds no tensors, and `get_optimizer_state_dict` would create
    them with a zero-gradient step, so saving would change the run)."""
    if isinstance(obj, torch.optim.Optimizer):
        return bool(obj.state)
    return isinstance(obj, (nn.Module, EMA))


def _tensor_state(obj: Any, components: dict[str, Any]) -> dict[str, Any]:
    """`obj`'s state as torch.distributed.checkpoint saves and loads it: sharded tensors under FSDP, whole ones else."""
    if isinstance(obj, torch.optim.Optimizer):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # Keyed by parameter name (not position), with sharded tensors under FSDP: loadable into any layout.
        return get_optimizer_state_dict(_owner(obj, components), obj)
    return obj.state_dict()


def _owner(optimizer: torch.optim.Optimizer, components: dict[str, Any]) -> nn.Module:
    """The model among `components` whose parameters `optimizer` updates."""
    first = optimizer.param_groups[0]["params"][0]
    for obj in components.values():
        if isinstance(obj, nn.Module) and any(p is first for p in obj.parameters()):
            return obj
    raise CheckpointError("an optimizer's parameters belong to none of the checkpointed models")


@contextlib.contextmanager
def _single_process_quietly(rt: Runtime) -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes one process when there is no process group, even when told
    so (`no_dist`); one process is the intent here."""
    with warnings.catch_warnings():
        if not rt.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ====================================================================================================================
# Resuming


def restore(saved: Saved, components: dict[str, Any], batches: BatchStream, cfg: Any, rt: Runtime) -> int:
    """Load `saved` into the components, the batch stream and this rank's RNGs; returns the step to continue from.
    Call it after every model is built and parallelized, since building draws from the RNGs being restored."""
    if saved.legacy:
        _load_legacy(saved, components)
    else:
        _load(saved, components, rt)
    old_world = len(saved.state["rng"])
    batches.resume_from(saved.state["data"])
    if old_world == rt.world_size:
        set_rng_state(saved.state["rng"][rt.rank])
    else:
        if rt.is_main:
            warnings.warn(f"resuming {saved.path}, saved by {old_world} process(es), on {rt.world_size}: the weights "
                          "and optimizer state are restored exactly and the data continues from the same sample, but "
                          "the random streams (masks, dropout) are reseeded, so the run is not the one it would have "
                          f"been on {old_world}", stacklevel=2)
        seed_everything(hash_seed(cfg.train.seed + rt.rank, int(saved.state["step"])))
    return int(saved.state["step"])


def _load(saved: Saved, components: dict[str, Any], rt: Runtime) -> None:
    """Components from a checkpoint directory, resharded to this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    stored = saved.state["components"]  # what trainer.pt holds; torch.distributed.checkpoint holds the others
    # The layout to fill: this run's (sharded or whole) tensors.
    tensors = {name: _tensor_state(obj, components) for name, obj in components.items() if name not in stored}
    try:
        with _single_process_quietly(rt):
            dcp.load(tensors, checkpoint_id=saved.path, no_dist=not rt.distributed)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - a missing, mismatched or damaged tensor
        raise CheckpointError(f"cannot load the checkpoint {saved.path} into this run ({_reason(error)})") from None
    for name, obj in components.items():
        if name in stored:
            _load_component(saved, name, obj, stored[name])
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(obj, components), obj, tensors[name])
        else:
            _load_component(saved, name, obj, tensors[name])


def _reason(error: BaseException) -> str:
    """One line for what went wrong: a CheckpointException (a BaseException, not an Exception) carries each rank's
    error with its whole traceback, of which the first error is what a user needs."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {type(error).__name__}: {error}".rstrip(": ")
    return f"{type(error).__name__}: {error}"


def _load_legacy(saved: Saved, components: dict[str, Any]) -> None:
    """Components from a legacy `last.pt`; under FSDP each rank keeps its shard of every tensor."""
    stored = saved.state["components"]
    missing = sorted(set(components) - set(stored))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {missing} (saved: {sorted(stored)})")
    for name, obj in components.items():
        state = stored[name]
        if isinstance(obj, (nn.Module, EMA)):
            current = obj.state_dict()
            state = {key: shard_like(value, current.get(key)) for key, value in state.items()}
        elif isinstance(obj, torch.optim.Optimizer):
            params = [p for group in obj.param_groups for p in group["params"]]
            state = {**state, "state": {
                index: {key: shard_like(value, params[index]) if _same_shape(value, params[index]) else value
                        for key, value in entry.items()}
                for index, entry in state["state"].items()}}
        _load_component(saved, name, obj, state)


def _same_shape(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape)


def _load_component(saved: Saved, name: str, obj: Any, state: dict[str, Any]) -> None:
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:  # a model of another size or layout: name what does not fit
        raise CheckpointError(f"the checkpoint {saved.path} does not fit this run's {name!r} "
                              f"({type(error).__name__}: {error})") from None


__all__ = [
    "CHECKPOINT_DIR", "LAST", "LEGACY_LAST", "CheckpointError", "Saved", "checkpoint_dir", "load_checkpoint",
    "latest_checkpoint", "read_checkpoint", "prepare_run_dir", "changed_keys", "start_from_weights", "rng_state",
    "set_rng_state", "save_checkpoint", "restore",
]
