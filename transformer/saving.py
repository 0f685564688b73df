"""Saved components: a directory holding `config.json` (the config dataclass) and `model.safetensors`.

Shared by `MaskedTransformer` and the super-resolution transformer, so both fail the same way on bad input:
a missing directory or file raises FileNotFoundError naming the path; an unreadable config or an unknown or missing key
raises ValueError naming the key; a corrupt or truncated weights file raises ValueError, never a raw safetensors error.

config.json also records the SHA-256 of the weights file (`weights_sha256`), checked on load: a flipped bit in a
copied model is an error naming the file, not silently different images. Directories saved before it are loaded
without the check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_HASH = "weights_sha256"  # the config.json key holding the weights file's SHA-256

ConfigT = TypeVar("ConfigT")


def save_component(path: str | Path, config: Any, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Write `config` and the weights of `model` into the directory `path` (created if needed), atomically per file;
    floating-point weights are stored in `dtype` when given (loading casts them to the model's dtype)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views that share storage, so store plain contiguous copies on the CPU.
    tensors = {name: _stored(t, dtype) for name, t in model.state_dict().items()}
    data = save_safetensors(tensors)
    config_text = json.dumps(dataclasses.asdict(config) | {WEIGHTS_HASH: hashlib.sha256(data).hexdigest()},
                             indent=2) + "\n"
    _write_atomic(path / WEIGHTS_NAME, data)
    _write_atomic(path / CONFIG_NAME, config_text.encode())


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def load_config(path: str | Path, config_cls: type[ConfigT]) -> ConfigT:
    """Read `config.json` from the directory `path` into `config_cls` (nested dataclasses included)."""
    data = _read_json(_existing_file(Path(path), CONFIG_NAME))
    data.pop(WEIGHTS_HASH, None)
    return config_from_dict(config_cls, data, where=str(Path(path) / CONFIG_NAME))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` in the directory `path`, checked against the SHA-256 its config.json
    records. Raises ValueError naming the file if it is damaged or not a safetensors file."""
    path = Path(path)
    file = _existing_file(path, WEIGHTS_NAME)
    data = file.read_bytes()
    expected = _read_json(_existing_file(path, CONFIG_NAME)).get(WEIGHTS_HASH)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{file} does not match the SHA-256 recorded in {path / CONFIG_NAME}: the file is damaged "
                         "(bit rot, an interrupted copy) or was replaced; restore it from its source")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"{file} is corrupt or truncated: {e}") from None


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load `model.safetensors` from the directory `path` into `model`, strictly (see `read_weights`)."""
    file = Path(path) / WEIGHTS_NAME
    state = read_weights(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs {want}")
    model.load_state_dict(state)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(cls: type[ConfigT], data: Any, where: str = "config") -> ConfigT:
    """Build the frozen dataclass `cls` from JSON data: nested dataclasses recurse, lists become tuples where typed so.

    Unknown and missing keys, and values the dataclass rejects, raise ValueError naming the dotted key.
    """
    return _build(cls, data, where, "")


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: '{prefix or cls.__name__}' must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown config key '{prefix}{unknown[0]}' for {cls.__name__}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing config key '{key}'")
            continue
        value, tp = data[name], hints[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, where, key + ".")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid {cls.__name__} ({prefix or 'config'}): {e}") from None


def _existing_file(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"saved model directory not found: {directory}")
    file = directory / name
    if not file.is_file():
        raise FileNotFoundError(f"{name} not found in {directory}")
    return file


def _write_atomic(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)

