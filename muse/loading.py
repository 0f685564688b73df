"""Reading and writing pipeline directories: what `MusePipeline.from_pretrained` and `save_pretrained` do.

Three sources, one result (`SavedPipeline`: the components by role, the text encoder, the config, a scorer folder):

* our directory: `pipeline.json` ({"components": {role: kind}, "config": PipelineConfig}), one folder per component
  read by its kind (`muse.components`), `text_encoder.json` (and `text_encoder/` when the encoder was local), and an
  optional `scorer/`;
* a diffusers aMUSEd directory (`model_index.json`): each component whose diffusers class a registered kind claims,
  a CLIP text encoder, and the scheduler's mask token and schedule;
* a Hugging Face hub id of one, fetched into the hub cache (read from it offline), or a bundled preset name.

The pipeline itself names no architecture: everything about a kind is in its registry entry.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import muse.bundled as bundled  # its ASSETS read at call time (tests point it elsewhere)
from muse.bundled import DEFAULT_PRESET, PIPELINE_FILE, bundled_presets
from muse.components import DIFFUSERS_ROLES, ROLES, diffusers_kind, kind_of, load_component, parse_components
from muse.options import PRECISIONS, Limits, SamplingOptions, amused_options, option_names
from transformer.config import TextEncoderConfig
from persist import atomic_write, atomic_write_dir, atomic_write_json, dataclass_from_dict, read_json_object
from persist.weights import CONFIG_NAME, WEIGHTS_NAME, read_component_dataclass, read_component_weights
from transformer.text import MINILM_ALIAS, TextEncoder

TEXT_ENCODER_FILE = "text_encoder.json"
TEXT_ENCODER_DIR = "text_encoder"  # a local text encoder is copied here so the saved pipeline is self-contained
SCORER_DIR = "scorer"  # a PromptScorer saved here inside a pipeline directory is the default best-of-N scorer
AMUSED_INDEX = "model_index.json"  # marks a diffusers pipeline directory
AMUSED_PIPELINES = ("AmusedPipeline", "AmusedInpaintPipeline", "AmusedImg2ImgPipeline")
AMUSED_TEXT_LENGTH = 77  # CLIP's context, which aMUSEd pads every prompt to
# What an aMUSEd download needs (the fp16 variants, the 512 px assets and the images of its model card are left out).
HUB_FILES = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
             "transformer/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline's defaults; saved as pipeline.json beside the components."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)  # what a call does not set
    mask_dilation: int = 1              # inpainting: tokens added around the masked ones, so edges are regenerated too
    seam: int = 4                       # inpainting: pixels outside the regenerated tokens over which it is feathered
    window_overlap: float = 0.5         # large canvases: fraction of the model's grid shared by neighbouring windows
    # The token models' arithmetic: "auto" runs them in bfloat16 where the device does it fast (a CPU with AMX or
    # AVX512-BF16, a GPU of compute capability 8.0 or more), else in float32. Set per model, once its quality in
    # bfloat16 was measured equal (`muse eval --precision`).
    precision: str = "float32"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.mask_dilation < 0 or self.seam < 0:
            raise ValueError(f"mask_dilation and seam must be >= 0, got {self.mask_dilation} and {self.seam}")
        if not 0.0 < self.window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in (0, 1), got {self.window_overlap}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.limits.check(self.sampling)

    def with_sampling(self, **overrides: Any) -> PipelineConfig:
        """This config with some sampling defaults replaced: `config.with_sampling(num_steps=12)`."""
        return dataclasses.replace(self, sampling=self.sampling.with_overrides(overrides))

    @staticmethod
    def from_dict(data: Any, where: str = "config") -> PipelineConfig:
        """Read a saved config; the flat layout of earlier versions (sampling options beside the others) too."""
        if isinstance(data, dict) and "sampling" not in data:
            flat = {k: v for k, v in data.items() if k in option_names()}
            data = {**{k: v for k, v in data.items() if k not in flat}, "sampling": flat}
        return dataclass_from_dict(PipelineConfig, data, source=where)


@dataclass
class SavedPipeline:
    """What a pipeline directory holds, loaded: the arguments of `MusePipeline(...)`, and a scorer not loaded yet."""

    components: dict[str, nn.Module]  # role -> component (vqgan, transformer, and optionally superres, superres_vqgan)
    text_encoder: TextEncoder
    config: PipelineConfig
    scorer_dir: Path | None = None    # a saved PromptScorer, loaded on first use (`MusePipeline.scorer`)


# --------------------------------------------------------------------------------------------------------------------
# Reading


def read_pipeline(path: str | os.PathLike | None, precision: str | None = None) -> SavedPipeline:
    """The pipeline that `path` names (see `MusePipeline.from_pretrained`), `precision` replacing its saved one.

    Raises FileNotFoundError for an unknown path or preset or a missing component, ValueError for a corrupt
    component, naming it, and OSError for a hub id that cannot be had (offline and not in the cache)."""
    path = resolve_model(path)
    manifest_file = path / PIPELINE_FILE
    if not manifest_file.is_file() and (path / AMUSED_INDEX).is_file():
        saved = read_diffusers(path)
    else:
        saved = _read_ours(path, manifest_file)
    if precision is not None:
        saved.config = dataclasses.replace(saved.config, precision=precision)
    return saved


def _read_ours(path: Path, manifest_file: Path) -> SavedPipeline:
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved MusePipeline: {PIPELINE_FILE} not found")
    manifest = read_json_object(manifest_file)
    if not isinstance(manifest, dict) or set(manifest) != {"components", "config"}:
        raise ValueError(f"{manifest_file} must be a JSON object with exactly the keys 'components' and 'config'")
    config = PipelineConfig.from_dict(manifest["config"], where=str(manifest_file))
    kinds = parse_components(manifest["components"], str(manifest_file))
    components = {role: load_named(role, path, lambda where, kind=kind: load_component(kind, where))
                  for role, kind in kinds.items()}
    text_encoder = load_named("text_encoder", path, _load_text_encoder)
    scorer_dir = None
    if (path / SCORER_DIR).is_dir():
        # Its towers load on first use, but its own files are checked now: a damaged scorer must stop the load,
        # not fail the first best-of-N request.
        load_named(SCORER_DIR, path, _check_scorer)
        scorer_dir = path / SCORER_DIR
    return SavedPipeline(components, text_encoder, config, scorer_dir)


def read_diffusers(path: Path) -> SavedPipeline:
    """A diffusers aMUSEd directory, read without diffusers: each component folder `model_index.json` names with a
    class a registered kind claims (aMUSEd: transformer/ UVit2DModel, vqvae/ VQModel), text_encoder/ + tokenizer/
    (CLIPTextModelWithProjection), scheduler/ (its mask token and schedule). Sampling defaults: the `amused` preset,
    AmusedScheduler's own. The weights' licence is the model's (aMUSEd: OpenRAIL++-M, on its model card); musegen
    redistributes none of them."""
    index_file = path / AMUSED_INDEX
    index = read_json_object(index_file)
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if kind not in AMUSED_PIPELINES:
        raise ValueError(f"{index_file}: _class_name is {kind!r}; musegen reads {', '.join(AMUSED_PIPELINES)}")
    components = {}
    for folder, entry in index.items():
        class_name = entry[-1] if isinstance(entry, list) and entry else None
        component_kind = diffusers_kind(class_name) if isinstance(class_name, str) else None
        if component_kind is not None:
            components[DIFFUSERS_ROLES[class_name]] = load_named(
                folder, path, lambda where, k=component_kind: load_component(k, where))
    for role in ("transformer", "vqgan"):
        if role not in components:
            raise ValueError(f"{index_file} names no {role} musegen reads (known diffusers classes: "
                             f"{', '.join(DIFFUSERS_ROLES)})")
    transformer = components["transformer"]
    text_encoder = load_named("text_encoder", path, lambda where: TextEncoder(
        TextEncoderConfig(str(path), kind="clip", max_length=AMUSED_TEXT_LENGTH)))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    schedule = "cosine"
    if scheduler_file.is_file():
        scheduler = read_json_object(scheduler_file)
        if scheduler.get("mask_token_id", transformer.config.mask_token_id) != transformer.config.mask_token_id:
            raise ValueError(f"{scheduler_file}: mask_token_id {scheduler['mask_token_id']} is not the "
                             f"transformer's last vocabulary id {transformer.config.mask_token_id}")
        schedule = scheduler.get("masking_schedule", schedule)
    config = PipelineConfig(sampling=dataclasses.replace(amused_options(), mask_schedule=schedule))
    return SavedPipeline(components, text_encoder, config)


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The pipeline directory that `path` names: an existing directory, a bundled preset name, or a Hugging Face hub
    id ("org/name") of an aMUSEd pipeline, fetched into the hub cache."""
    if path is None:
        if DEFAULT_PRESET not in bundled_presets():
            raise FileNotFoundError(
                "the bundled default model is not installed in this version of musegen; pass the directory of a "
                "saved pipeline instead: MusePipeline.from_pretrained('path/to/model') (--model PATH on the command "
                "line)"
            )
        return bundled.ASSETS / DEFAULT_PRESET
    directory = Path(path)
    if directory.is_dir():
        return directory
    if isinstance(path, str) and path in bundled_presets():
        return bundled.ASSETS / path
    if isinstance(path, str) and _looks_like_hub_id(path):
        return _hub_download(path)
    presets = bundled_presets()
    known = f"; bundled presets: {', '.join(presets)}" if presets else ""
    raise FileNotFoundError(f"no pipeline directory or bundled preset named {os.fspath(path)!r}{known}")


def _looks_like_hub_id(name: str) -> bool:
    """"org/name" with no path-like parts: what the hub calls a repository, and no directory here."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _hub_download(repo_id: str) -> Path:
    """The local snapshot of a hub repository: the cache first (so an offline machine never waits on the network),
    else a download. OSError, saying what to do, when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise OSError(f"{repo_id!r} is neither a local directory nor in the Hugging Face cache, and downloading it "
                      f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). With internet, run "
                      f"it once to cache it (or `hf download {repo_id}`, the command huggingface-hub installs); "
                      "offline, copy a download and pass its directory") from None


def load_named(name: str, path: Path, load: Callable[[Path], Any]) -> Any:
    """Load the pipeline's component `name` (a folder of `path`; text_encoder.json for "text_encoder"), re-raising
    its error with the component's name in front."""
    where = path / (TEXT_ENCODER_FILE if name == "text_encoder" else name)
    if name != "text_encoder" and not where.resolve().is_relative_to(path.resolve()):
        # As for a text encoder's path (`_text_encoder_location`): a pipeline someone sent must not read files
        # elsewhere on this machine through a component folder that is a symlink out of it.
        raise ValueError(f"the pipeline's {name} at {where} leaves the pipeline directory (it resolves to "
                         f"{where.resolve()}); component folders must be inside it")
    try:
        return load(path if name == "text_encoder" else where)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the pipeline's {name} at {where} is missing: {e}") from None
    except ValueError as e:
        raise ValueError(f"the pipeline's {name} at {where} is unreadable: {e}") from None
    except OSError as e:
        raise OSError(f"the pipeline's {name} at {where} cannot be loaded: {e}") from None


def load_scorer(scorer_dir: Path, device: torch.device) -> Any:
    """The `muse.scorer.PromptScorer` saved in a pipeline's `scorer/`, its frozen towers loaded now."""
    from muse.scorer import PromptScorer

    return load_named(SCORER_DIR, scorer_dir.parent, lambda where: PromptScorer.load(where, device=device))


def _check_scorer(path: Path) -> None:
    from muse.scorer import ScorerConfig

    _, digest = read_component_dataclass(path, ScorerConfig)
    read_component_weights(path, digest)


def _load_text_encoder(path: Path) -> TextEncoder:
    file = path / TEXT_ENCODER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    config = dataclass_from_dict(TextEncoderConfig, read_json_object(file), source=str(file))
    return TextEncoder(dataclasses.replace(config, name_or_path=_text_encoder_location(config.name_or_path, path,
                                                                                       file)))


def _text_encoder_location(name: str, pipeline: Path, file: Path) -> str:
    """Where text_encoder.json's `name_or_path` points. A relative path is a directory inside the pipeline (a
    copied local encoder), wherever the pipeline now is, and may not leave it: a pipeline someone sent must not read
    files elsewhere on this machine. A text encoder elsewhere is named explicitly, by an absolute path (the opt-in)
    or a hub name ("org/name"), or is the "minilm" alias."""
    if name == MINILM_ALIAS or Path(name).is_absolute():
        return name
    local = pipeline / name
    if not local.resolve().is_relative_to(pipeline.resolve()):
        raise ValueError(f"{file}: name_or_path {name!r} leaves the pipeline directory; a text encoder outside it "
                         "must be named by an absolute path or a hub name")
    if local.is_dir():
        return str(local)
    if name.startswith("."):
        raise FileNotFoundError(f"{file}: the text encoder directory {name!r} is not in the pipeline directory")
    return name  # a hub name such as "google/t5-v1_1-xxl"


# --------------------------------------------------------------------------------------------------------------------
# Writing


def save_pipeline(
    path: str | os.PathLike,
    components: dict[str, nn.Module | None],
    text_encoder: TextEncoder,
    config: PipelineConfig,
    scorer: Any,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a pipeline directory (see `MusePipeline.save_pretrained`): the components by role, the text encoder,
    `scorer` (a folder of a saved scorer not loaded yet, which is copied; an object with `save`; or anything else,
    which is the caller's code and not saved) and, last, pipeline.json.

    The pipeline is written into a new folder beside `path` and swapped in at the end: nothing of what was at
    `path` before survives into it, and an interrupted save leaves the old one whole."""
    atomic_write_dir(path, lambda fresh: _write(fresh, components, text_encoder, config, scorer, dtype))


def _write(path: Path, components: dict[str, nn.Module | None], text_encoder: TextEncoder, config: PipelineConfig,
           scorer: Any, dtype: torch.dtype | None) -> None:
    """save_pipeline's work, into the empty folder `path`."""
    kinds = {}
    for role in ROLES:
        module = components.get(role)
        if module is not None:
            module.save_pretrained(path / role, dtype)
            kinds[role] = kind_of(module)

    text_config = text_encoder.config
    if text_config.name_or_path != MINILM_ALIAS and Path(text_encoder.source).is_dir():
        # A local model would not exist on another machine: ship a copy and point at it (relative to `path`).
        text_encoder.save_pretrained(path / TEXT_ENCODER_DIR)
        text_config = dataclasses.replace(text_config, name_or_path=TEXT_ENCODER_DIR)
    atomic_write_json(path / TEXT_ENCODER_FILE, dataclasses.asdict(text_config))
    target = path / SCORER_DIR
    if isinstance(scorer, Path):
        # Not loaded yet: copy its two files rather than load its towers just to write them back.
        target.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            atomic_write(target / name, lambda tmp, name=name: shutil.copyfile(scorer / name, tmp))
    elif hasattr(scorer, "save"):
        scorer.save(target)
    # A scorer that is a plain function is the caller's code, not a component: nothing to save.
    atomic_write_json(path / PIPELINE_FILE, {"components": kinds, "config": dataclasses.asdict(config)})
