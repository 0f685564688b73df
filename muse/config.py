"""Run configs: YAML presets <-> frozen dataclasses.

A preset is a YAML file whose `stage:` key picks the run dataclass (`vqgan`, `transformer`, `superres` or `scorer`);
every other top-level key is one of that dataclass's fields. Loading is strict: an unknown or mistyped key raises a
`ConfigError` naming its dotted path (`train.lrr`), so a typo never silently falls back to a default.

    cfg = load_config("configs/vqgan/emoji-f8.yaml", overrides=["train.lr=2e-4", "model.codebook_size=4096"])
    save_config(cfg, run_dir / "config.yaml")   # saved beside every checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from superres.config import SuperResConfig
from transformer.config import TextEncoderConfig, TransformerConfig
from vqgan.config import VQGANConfig, VQGANLossConfig


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


@dataclass(frozen=True)
class DataConfig:
    path: str                       # image folder, directory of webdataset shards, or directory of token shards
    format: str = "folder"          # folder | webdataset | tokens
    resolution: int = 64            # images are resized (short side) and cropped to this size
    crop: str = "center"            # center | random
    split: str | None = "train"     # metadata split to train on (folder format); None = all rows
    val_split: str | None = "heldout"
    val_path: str | None = None     # defaults to `path`
    num_workers: int = 0
    # Training captions (folder format): "canonical", each row's `caption`; "all", one item per phrasing in the
    # row's `captions` list too (the emoji builder writes several), so prompts need not follow one template.
    # Validation always uses the canonical caption.
    captions: str = "canonical"

    def __post_init__(self) -> None:
        if self.format not in ("folder", "webdataset", "tokens"):
            raise ValueError(f"format must be folder, webdataset or tokens, got {self.format!r}")
        if self.captions not in ("canonical", "all"):
            raise ValueError(f"captions must be canonical or all, got {self.captions!r}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be center or random, got {self.crop!r}")


PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str
    steps: int
    batch_size: int                 # per process; the global batch is batch_size * world size
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # None = no EMA copy of the weights
    mixed_precision: bool = True    # bf16 autocast where bf16 is fast: CUDA, AMX/AVX512-BF16 CPUs (not AVX2-only)
    # ddp: every process holds the whole model and optimizer. fsdp: PyTorch's FSDP2 shards parameters, gradients and
    # optimizer state over the processes, one unit per transformer block (masked-token stages only).
    parallel: str = "ddp"
    compile: bool = False           # torch.compile each transformer block (CUDA; the first steps pay for compiling)
    tf32: bool = True               # TF32 tensor cores for the float32 matmuls left outside autocast (CUDA only)
    seed: int = 0
    log_every: int = 50
    val_every: int = 1000
    sample_every: int = 1000        # reconstruction / sample grids
    save_every: int = 1000
    logger: str = "tensorboard"     # tensorboard | csv
    # A model directory (save_pretrained / a run's export / a pipeline component) whose weights start a fresh run
    # (fine-tuning, or continuing a model whose checkpoint is lost); ignored when --resume finds a checkpoint.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        # NaN passed every comparison before (`--set train.lr=nan` trained on NaN weights): every number is checked.
        # lr 0 is allowed: the weights then stay as they start (checking init_from, measuring throughput).
        for name, low, high in (("lr", 0.0, None), ("weight_decay", 0.0, None), ("min_lr_ratio", 0.0, 1.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low
                    and (high is None or value <= high)):
                bounds = f">= {low}" + ("" if high is None else f" and <= {high}")
                raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0 or null, got {self.grad_clip!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("log_every", "val_every", "sample_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.logger not in ("tensorboard", "csv"):
            raise ValueError(f"logger must be tensorboard or csv, got {self.logger!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")


@dataclass(frozen=True)
class MaskingConfig:
    schedule: str = "cosine"        # the sampling.schedule name shared with the sampler
    text_dropout: float = 0.1       # fraction of samples trained with the empty prompt, for classifier-free guidance
    label_smoothing: float = 0.0
    val_ratios: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    lowres_corruption: float = 0.0  # super-res only: fraction of low-res tokens replaced at random


@dataclass(frozen=True)
class VQGANRun:
    model: VQGANConfig
    data: DataConfig
    train: TrainConfig
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    # "decoder": train the decoder alone, the encoder and codebook frozen, so that token ids keep their meaning and
    # the transformer stages trained on them stay valid (mending what the decoder draws, e.g. its borders).
    trainable: str = "all"
    stage: str = "vqgan"

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "decoder"):
            raise ValueError(f"trainable must be all or decoder, got {self.trainable!r}")


@dataclass(frozen=True)
class TransformerRun:
    model: TransformerConfig
    text: TextEncoderConfig
    vqgan: str                      # directory of the trained VQGAN (tokenizes images, decodes sample grids)
    data: DataConfig
    train: TrainConfig
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    stage: str = "transformer"


@dataclass(frozen=True)
class SuperResRun:
    model: SuperResConfig
    text: TextEncoderConfig
    vqgan_low: str                  # tokenizer of the low-res grid
    vqgan_high: str                 # tokenizer of the high-res grid (may be the same directory)
    data: DataConfig
    train: TrainConfig
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    low_resolution: int = 64        # pixel size of the low-res image the pair is made from
    stage: str = "superres"


# The prompt scorer's model config is defined here rather than beside `PromptScorer` (muse/scorer.py) so that loading
# any preset stays free of torch and the scorer's towers; muse.scorer imports it from here.
@dataclass(frozen=True)
class ScorerConfig:
    """The frozen towers and the learned heads; saved as config.json beside the heads' weights."""

    text_encoder: str = "minilm"      # TextEncoder name_or_path of the frozen text tower (the offline MiniLM alias)
    text_kind: str = "auto"           # TextEncoder kind ("auto" for MiniLM)
    max_length: int = 32              # prompt tokens; emoji captions are far shorter
    image_size: int = 128             # side in pixels every image is resized to before EfficientNet-Lite0
    hidden_dim: int = 512
    embed_dim: int = 256
    dropout: float = 0.1              # on the heads' hidden layer, while training
    init_temperature: float = 0.07    # CLIP's initial temperature

    def __post_init__(self) -> None:
        for name in ("max_length", "image_size", "hidden_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (EfficientNet-Lite0 downsamples by 32), got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.init_temperature <= 1.0:
            raise ValueError(f"init_temperature must be in (0, 1], got {self.init_temperature}")


@dataclass(frozen=True)
class ScorerDataConfig:
    path: str                                # image-caption folder; the scorer trains on its "train" split
    # Each image is rendered at every size here (a pre-rendered size when the folder has one); each rendering is a
    # view, and a training pair draws one at random, so the scorer sees both small samples and large renders.
    source_sizes: tuple[int, ...] = (64, 128)
    cache_dir: str | None = None             # frozen-feature cache; None = `train.out_dir/feature-cache`
    # At most this many images of each split (a fixed random subset, the same for every run): feature extraction
    # costs ~0.1 s per image and view on 2 CPU cores, so a quick run can bound it. None = every image.
    max_images: int | None = None

    def __post_init__(self) -> None:
        if not self.source_sizes or any(s < 1 for s in self.source_sizes):
            raise ValueError(f"source_sizes must be positive sizes, got {self.source_sizes!r}")
        if self.max_images is not None and self.max_images < 2:
            raise ValueError(f"max_images must be at least 2 (the scorer contrasts pairs), got {self.max_images}")


@dataclass(frozen=True)
class ScorerTrainConfig:
    out_dir: str
    steps: int = 1000
    batch_size: int = 256           # pairs per contrastive batch (capped at the number of training pairs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    log_every: int = 500            # 0 = no progress lines
    device: str = "cpu"             # the heads are small: the frozen features dominate, and they are cached

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps} and {self.batch_size}")


@dataclass(frozen=True)
class ScorerRun:
    data: ScorerDataConfig
    train: ScorerTrainConfig
    model: ScorerConfig = field(default_factory=ScorerConfig)
    stage: str = "scorer"


RunConfig = Union[VQGANRun, TransformerRun, SuperResRun, ScorerRun]
STAGES: dict[str, type] = {"vqgan": VQGANRun, "transformer": TransformerRun, "superres": SuperResRun,
                           "scorer": ScorerRun}


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the (nested, frozen) dataclass `cls` from plain data, strictly.

    Unknown keys, missing required keys and values of the wrong type raise `ConfigError` naming the dotted path.
    """
    return _convert(cls, data, path)


def config_to_dict(cfg: Any) -> dict:
    """The dataclass as plain YAML/JSON-able data (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML preset, apply `dotted.key=value` overrides, and build its run dataclass."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    stage = data.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{path}: 'stage' must be one of {sorted(STAGES)}, got {stage!r}")
    return from_dict(STAGES[stage], data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _convert(tp: Any, value: Any, path: str) -> Any:
    where = path or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept anything float() accepts.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _convert_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
