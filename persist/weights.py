"""Weights on disk: safetensors files with their SHA-256, strict state-dict loads, and the component directory.

A component directory of ours holds `config.json` (the model's config, plus `weights_sha256`, the SHA-256 of the
weights file) and the weights file (`model.safetensors`, or diffusers' name for the diffusers layout). Integrity is
required, not optional:

- Our save paths always record the hash (`save_component`), and loading checks it: a flipped bit in a copied model
  is an error naming the file, never silently different images.
- A config.json of ours without `weights_sha256` is refused with a one-line error saying how to fix it, so deleting
  the hash cannot switch the check off. A component is ours when its config is one of our formats, or, for the
  diffusers layout, when it sits in a musegen pipeline directory (its parent holds `pipeline.json`).
- Foreign directories -- a diffusers aMUSEd download (`model_index.json` beside `transformer/config.json`), a Hugging
  Face BERT text encoder -- carry no hash of ours. Their weights are read here with safetensors only
  (`load_unhashed_safetensors`), which parses tensors and executes no code; pickle-based `.bin` / `.pt` files are
  never read by this module. (Other text encoders are loaded by transformers, whose `torch.load` fallback for `.bin`
  files runs with `weights_only=True`.)

Imports torch and safetensors; the torch-free rest of `persist` does not import this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_bytes
from safetensors.torch import load_file as _load_file
from safetensors.torch import save as _save_bytes
from torch import Tensor, nn

from persist.files import atomic_write_bytes, atomic_write_json, read_json_object
from persist.strict import dataclass_from_dict, dataclass_to_dict

T = TypeVar("T")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# diffusers' name, which the aMUSEd kinds (transformer/uvit.py, vqgan/vqmodel.py) keep so that a saved one is a
# diffusers component too.
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_HASH = "weights_sha256"  # the config.json key holding the weights file's SHA-256
PIPELINE_FILE = "pipeline.json"  # marks a musegen pipeline directory; its component folders are ours
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What safetensors raises for a damaged file, depending on where the damage is.
_UNREADABLE = (SafetensorError, OSError, ValueError, RuntimeError)


def cpu_state(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The state dict of `module` as contiguous CPU copies (safetensors refuses views that share storage),
    floating-point tensors cast to `dtype` when given."""
    state = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


def save_safetensors(file: str | os.PathLike, tensors: Mapping[str, Tensor],
                     metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` as the safetensors file `file`, atomically; returns the file's SHA-256 (hex), which the caller
    records (`save_component` does, in config.json)."""
    data = _save_bytes(dict(tensors), metadata)
    atomic_write_bytes(file, data)
    return hashlib.sha256(data).hexdigest()


def load_safetensors(file: str | os.PathLike, sha256: str, *, recorded_in: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of the safetensors file `file`, whose SHA-256 must be `sha256` (recorded in the file
    `recorded_in`, named in the error). ValueError when it differs or the file is not a safetensors file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    data = file.read_bytes()  # hashed and parsed from the same bytes: nothing can change in between
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{file} does not match the SHA-256 recorded in {recorded_in}: the file is damaged "
                         "(bit rot, an interrupted copy) or was replaced; restore it from its source")
    try:
        return _load_bytes(data)
    except _UNREADABLE as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from None


def load_unhashed_safetensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a foreign safetensors file that no hash of ours covers (a diffusers or Hugging Face download):
    parsed by safetensors, which executes no code. ValueError when it is not a safetensors file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return _load_file(str(file))
    except _UNREADABLE as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from None


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """`module.load_state_dict(state, strict=True)`, failing with a ValueError that names `source` and the first
    missing, unexpected or wrongly shaped keys instead of torch's multi-line RuntimeError. Tensors are cast to the
    module's dtypes by the load."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the config: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source} does not match the config: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the config needs {tuple(expected[name].shape)}")
    module.load_state_dict(state, strict=True)


def save_component(directory: str | os.PathLike, config: Any, module: nn.Module, *,
                   dtype: torch.dtype | None = None, weights_name: str = WEIGHTS_NAME) -> None:
    """Write the weights of `module` (floating-point ones in `dtype` when given) and `config.json` (`config`, a
    dataclass or a mapping, plus `weights_sha256`) into `directory`, created if needed; each file atomically, the
    config last, so a crash between the two leaves a hash that the new weights do not match -- refused on load,
    never half-loaded."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = dataclass_to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
    digest = save_safetensors(directory / weights_name, cpu_state(module, dtype))
    atomic_write_json(directory / CONFIG_NAME, {**data, WEIGHTS_HASH: digest})


def in_pipeline_directory(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a component folder of a musegen pipeline directory (whose components are ours)."""
    return (Path(directory).parent / PIPELINE_FILE).is_file()


def read_component_config(directory: str | os.PathLike, *, weights_name: str = WEIGHTS_NAME,
                          require_hash: bool = True) -> tuple[dict[str, Any], str | None]:
    """The content of `directory/config.json` without `weights_sha256`, and that hash (None only when
    `require_hash` is False and there is none: a foreign directory).

    FileNotFoundError when the directory or its config is missing (a missing weights file is found when they are
    read); ValueError for an unreadable config, or one of ours (`require_hash`) that records no valid hash."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"saved model directory not found: {directory}")
    config_file = directory / CONFIG_NAME
    data = read_json_object(config_file)
    digest = data.pop(WEIGHTS_HASH, None)
    if digest is None and require_hash:
        raise ValueError(
            f"{config_file} records no {WEIGHTS_HASH} for {weights_name}, so damage to it could not be detected: "
            f"re-save the model with save_pretrained (a pipeline: `muse assemble` or `muse convert`), or, if you "
            f"trust the file, add \"{WEIGHTS_HASH}\": \"<the sha256sum of {weights_name}>\" to {CONFIG_NAME}")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ValueError(f"{config_file}: {WEIGHTS_HASH} must be 64 lowercase hex digits, got a "
                         f"{type(digest).__name__} of another form")
    return data, digest


def read_component_dataclass(directory: str | os.PathLike, cls: type[T], *,
                             weights_name: str = WEIGHTS_NAME) -> tuple[T, str]:
    """The config of one of our components as the dataclass `cls` (strictly: `dataclass_from_dict`), and the
    SHA-256 of its weights, which it must record (`read_component_config`)."""
    data, digest = read_component_config(directory, weights_name=weights_name)
    return dataclass_from_dict(cls, data, source=str(Path(directory) / CONFIG_NAME)), digest


def read_component_weights(directory: str | os.PathLike, sha256: str | None, *,
                           weights_name: str = WEIGHTS_NAME) -> dict[str, Tensor]:
    """The tensors of the component's weights file, checked against `sha256` from `read_component_config` (None:
    a foreign directory, read unhashed)."""
    file = Path(directory) / weights_name
    if sha256 is None:
        return load_unhashed_safetensors(file)
    return load_safetensors(file, sha256, recorded_in=Path(directory) / CONFIG_NAME)


def load_component_weights(directory: str | os.PathLike, module: nn.Module, sha256: str | None, *,
                           weights_name: str = WEIGHTS_NAME) -> None:
    """`read_component_weights` loaded into `module` strictly (`load_state_dict_strict`)."""
    state = read_component_weights(directory, sha256, weights_name=weights_name)
    load_state_dict_strict(module, state, str(Path(directory) / weights_name))


def load_diffusers_component(directory: str | os.PathLike, build: Callable[[dict[str, Any], str], nn.Module]
                             ) -> nn.Module:
    """A component in diffusers' layout (config.json and diffusion_pytorch_model.safetensors), such as a folder of
    an aMUSEd download: `build(config, where)` makes the module from the config's content, then the weights load
    strictly; eval mode, on the CPU. The SHA-256 is checked when config.json records one and required inside a
    musegen pipeline directory; a foreign download has none and is read with safetensors (no code runs)."""
    data, digest = read_component_config(directory, weights_name=DIFFUSERS_WEIGHTS_NAME,
                                         require_hash=in_pipeline_directory(directory))
    model = build(data, str(Path(directory) / CONFIG_NAME))
    load_component_weights(directory, model, digest, weights_name=DIFFUSERS_WEIGHTS_NAME)
    return model.eval()
