"""The kinds of component a pipeline is made of, by name: the registry `pipeline.json` refers to.

A pipeline directory holds one folder per component, and `pipeline.json` names each one's kind:

    {"components": {"vqgan": "vqgan", "transformer": "masked_transformer"}, "config": {...}}

A kind is a class with `from_pretrained(path)` and `save_pretrained(path, dtype)`. Token predictors (the `transformer`
and `superres` roles) also follow `muse.engine.TokenPredictor`: `config.mask_token_id`, `config.codebook_size`,
`config.grid_size`, `config.text_dim` (and `config.pooled_dim` when they read a pooled text vector),
`text_context(states, mask, pooled)` computed once per task, and `forward(tokens, context, positions, grid)`. VQ kinds
have `encode(images in [-1, 1]) -> ids`, `decode(ids) -> images in [-1, 1]`, `config.codebook_size` and
`config.downsample_factor`.

A kind also says what diffusers calls it (`diffusers`, the class name in a diffusers pipeline's `model_index.json`),
so a diffusers directory is read by the same registry (`muse.loading`). A second architecture plugs in here, with no
edit to `muse/pipeline.py`; `check_components` holds the rules every set of components must meet.

The classes are imported here, by name, so that a reader and `tests/test_imports.py` see what the pipeline is built
from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from superres.model import SuperResTransformer
from transformer.model import MaskedTransformer
from transformer.uvit import UVit2D
from vqgan.model import VQGAN
from vqgan.vqmodel import VQModel

# What each role may be (type hints for the pipeline, which names no class itself).
ImageTokenizer = Union[VQGAN, VQModel]           # the vqgan and superres_vqgan roles
BaseTransformer = Union[MaskedTransformer, UVit2D]  # the transformer role
SuperResModel = SuperResTransformer              # the superres role


@dataclass(frozen=True)
class ComponentKind:
    """One kind of component: its class, and the name diffusers' `model_index.json` gives it (None: not a diffusers
    component). Our directory and a diffusers component folder are both read by `cls.from_pretrained`."""

    cls: type
    diffusers: str | None = None

    def load(self, path: Path) -> Any:
        """The component of this kind saved in the directory `path`."""
        return self.cls.from_pretrained(path)


KINDS: dict[str, ComponentKind] = {
    "vqgan": ComponentKind(VQGAN),                                  # our VQGAN (the emoji models)
    "vqmodel": ComponentKind(VQModel, diffusers="VQModel"),         # diffusers' VQModel layout (aMUSEd)
    "masked_transformer": ComponentKind(MaskedTransformer),         # Muse's base transformer
    "uvit2d": ComponentKind(UVit2D, diffusers="UVit2DModel"),       # aMUSEd's U-ViT
    "superres_transformer": ComponentKind(SuperResTransformer),
}
ROLES = ("vqgan", "transformer", "superres", "superres_vqgan")
# The kind of each role in directories saved before pipeline.json named kinds (a list of roles).
DEFAULT_KINDS = {"vqgan": "vqgan", "transformer": "masked_transformer", "superres": "superres_transformer",
                 "superres_vqgan": "vqgan"}
# The role a diffusers component plays in our pipeline, by its diffusers class name.
DIFFUSERS_ROLES = {"VQModel": "vqgan", "UVit2DModel": "transformer"}


def component_class(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind].cls


def kind_of(component: Any) -> str:
    """The registered kind of a component object (its exact class)."""
    for name, kind in KINDS.items():
        if type(component) is kind.cls:
            return name
    raise ValueError(f"{type(component).__name__} is not a registered component kind; add it to muse.components.KINDS")


def diffusers_kind(class_name: str) -> str | None:
    """The registered kind that diffusers calls `class_name`, or None."""
    return next((name for name, kind in KINDS.items() if kind.diffusers == class_name), None)


def load_component(kind: str, path: Path) -> Any:
    """The component of `kind` saved in the directory `path`."""
    component_class(kind)  # an unknown kind is named
    return KINDS[kind].load(path)


def parse_components(components: Any, where: str) -> dict[str, str]:
    """pipeline.json's "components": {role: kind}, or the earlier list of roles -> {role: kind}, checked."""
    if isinstance(components, list):
        components = {role: DEFAULT_KINDS.get(role, "?") for role in components}
    if not isinstance(components, dict) or not {"vqgan", "transformer"} <= set(components) <= set(ROLES):
        raise ValueError(f"{where}: 'components' must name vqgan, transformer and optionally superres and "
                         f"superres_vqgan, each with its kind; got {components!r}")
    for role, kind in components.items():
        if kind not in KINDS:
            raise ValueError(f"{where}: component {role!r} has unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return dict(components)


def check_components(vqgan: Any, text_encoder: Any, transformer: Any, superres: Any, superres_vqgan: Any,
                     default_stages: int | None) -> None:
    """Raise ValueError, naming both sides, unless the components fit together: code counts, text widths (and the
    pooled text vector of architectures conditioned on one, such as aMUSEd's), and the super-res stage's grids.
    `default_stages` is the pipeline's `config.sampling.stages`."""
    t = transformer.config
    if t.codebook_size != vqgan.config.codebook_size:
        raise ValueError(f"the transformer predicts {t.codebook_size} codes but the VQGAN has "
                         f"{vqgan.config.codebook_size}")
    if t.text_dim != text_encoder.dim:
        raise ValueError(f"the transformer expects text states of width {t.text_dim}, the text encoder gives "
                         f"{text_encoder.dim}")
    pooled = getattr(t, "pooled_dim", None)
    if pooled is not None and pooled != getattr(text_encoder, "pooled_dim", None):
        raise ValueError(f"the transformer expects a pooled text vector of width {pooled}, the text encoder "
                         f"gives {getattr(text_encoder, 'pooled_dim', None)}")
    if superres is None:
        if superres_vqgan is not None:
            raise ValueError("superres_vqgan was given without a superres model")
        if default_stages == 2:
            raise ValueError("config.sampling.stages=2 needs a super-resolution stage, and this pipeline has none")
        return
    s = superres.config
    high_vqgan = vqgan if superres_vqgan is None else superres_vqgan
    if s.low_codebook_size != vqgan.config.codebook_size:
        raise ValueError(f"the super-res model reads {s.low_codebook_size} low-res codes but the base VQGAN has "
                         f"{vqgan.config.codebook_size}")
    if s.high.codebook_size != high_vqgan.config.codebook_size:
        raise ValueError(f"the super-res model predicts {s.high.codebook_size} codes but its VQGAN has "
                         f"{high_vqgan.config.codebook_size}")
    if s.high.text_dim != text_encoder.dim:
        raise ValueError(f"the super-res model expects text states of width {s.high.text_dim}, the text encoder "
                         f"gives {text_encoder.dim}")
    if s.high.grid_size % t.grid_size:
        raise ValueError(f"the super-res grid ({s.high.grid_size}) must be a multiple of the base grid "
                         f"({t.grid_size})")
    if s.low_grid_size != t.grid_size:
        raise ValueError(f"the super-res model was trained on {s.low_grid_size}x{s.low_grid_size} low-res grids, "
                         f"the base transformer makes {t.grid_size}x{t.grid_size}")
