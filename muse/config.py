"""Run configs: YAML presets <-> frozen dataclasses.

A preset is a YAML file whose `stage:` key picks the run dataclass (`vqgan`, `transformer`, `superres` or `scorer`);
every other top-level key is one of that dataclass's fields. Loading is strict: an unknown or mistyped key raises a
`ConfigError` naming its dotted path (`train.lrr`), so a typo never silently falls back to a default.

    cfg = load_config("configs/vqgan/emoji-f8.yaml", overrides=["train.lr=2e-4", "model.codebook_size=4096"])
    save_config(cfg, run_dir / "config.yaml")   # saved beside every checkpoint
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import yaml

from persist import ConfigError, atomic_write_text, bounded_repr, dataclass_from_dict, read_bytes_bounded
from persist import dataclass_to_dict as config_to_dict  # the dataclass as plain YAML/JSON-able data
from superres.config import SuperResConfig
from transformer.config import TextEncoderConfig, TransformerConfig
from vqgan.config import VQGANConfig, VQGANLossConfig


# A preset is a few kilobytes; a config file far larger is a mistake or an attack, refused before it is parsed.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 32  # mapping / list levels; our presets use three


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
    """Build the (nested, frozen) dataclass `cls` from plain data, strictly (`persist.dataclass_from_dict`).

    Unknown keys, missing required keys and values of the wrong type raise `ConfigError` naming the dotted path.
    """
    return dataclass_from_dict(cls, data, prefix=path)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML preset, apply `dotted.key=value` overrides, and build its run dataclass.

    The file is bounded before it is parsed (`MAX_CONFIG_BYTES`, a regular file), and the YAML itself
    (`MAX_YAML_DEPTH`, no aliases): a small file cannot expand into gigabytes or exhaust the parser's stack. Every
    error is a one-line `ConfigError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = read_bytes_bounded(path, MAX_CONFIG_BYTES)  # a regular file only: a FIFO would block the read
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    data = _load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    stage = data.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{path}: 'stage' must be one of {sorted(STAGES)}, got {bounded_repr(stage)}")
    try:
        return from_dict(STAGES[stage], data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the run config `cfg` as a YAML preset that `load_config` reads back equal (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


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
    node[leaf] = _load_yaml(raw, f"override {bounded_repr(item)}")


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases and nesting deeper than MAX_YAML_DEPTH.

    Aliases: nine anchors of nine aliases each make a 1 KB file stand for 9**9 values (the "billion laughs"); our
    presets never need them, so any `*name` is refused rather than counted. Depth: the composer recurses once per
    level, so 50000 `[` would end in a RecursionError; configs are a few levels deep. Both end in a one-line
    error within milliseconds."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Checked as `[` / `{` are scanned, not only when composed: the scanner looks up to 1024 characters ahead
        # for a possible simple key, at a cost quadratic in the open brackets.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _YAMLRefused(f"line {self.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _YAMLRefused(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a config file; "
                               "write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YAMLRefused(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _YAMLRefused(Exception):
    """YAML that `_BoundedLoader` will not build."""


def _load_yaml(text: str, source: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _YAMLRefused as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        # PyYAML's messages span lines (context, problem, marks): one line is easier to read in a log.
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
