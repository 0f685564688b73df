"""The component-directory functions under their former names, for the modules not yet moved to `persist.weights`
(muse/pipeline.py, muse/train/runtime.py). New code imports `persist.weights`; delete this file once those two do.

`load_config` here read a component's config.json; it is `load_component_config` now, a distinct name from
`muse.config.load_config`, which reads a training run's YAML preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from persist import dataclass_from_dict
from persist import weights as _weights
from persist.weights import CONFIG_NAME, WEIGHTS_HASH, WEIGHTS_NAME

ConfigT = TypeVar("ConfigT")


def save_component(path: str | Path, config: Any, model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """`persist.weights.save_component` (config.json with `weights_sha256`, and model.safetensors)."""
    _weights.save_component(path, config, model, dtype=dtype)


def load_component_config(path: str | Path, config_cls: type[ConfigT]) -> ConfigT:
    """The config dataclass of the component saved in the directory `path` (`persist.weights.read_component_dataclass`,
    which also requires the weights' SHA-256)."""
    return _weights.read_component_dataclass(path, config_cls)[0]


load_config = load_component_config  # the former name, still imported by muse/pipeline.py


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the component in `path`, checked against the SHA-256 its config.json must record."""
    _, digest = _weights.read_component_config(path)
    return _weights.read_component_weights(path, digest)


def load_weights(path: str | Path, model: nn.Module) -> None:
    """The weights of the component in `path` loaded into `model`, hash-checked and strictly."""
    _, digest = _weights.read_component_config(path)
    _weights.load_component_weights(path, model, digest)


def config_from_dict(cls: type[ConfigT], data: Any, where: str = "config") -> ConfigT:
    """`persist.dataclass_from_dict` with the file named `where`."""
    return dataclass_from_dict(cls, data, source=where)


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "WEIGHTS_HASH", "save_component", "load_component_config", "load_config",
           "read_weights", "load_weights", "config_from_dict"]
