"""The kinds of component a pipeline is made of, by name: the registry `pipeline.json` refers to.

A pipeline directory holds one folder per component, and `pipeline.json` names each one's kind:

    {"components": {"vqgan": "vqgan", "transformer": "masked_transformer"}, "config": {...}}

A kind is a class with `from_pretrained(path)` and `save_pretrained(path, dtype)`. Token predictors (the `transformer`
and `superres` roles) also follow `muse.engine.TokenPredictor`: `config.mask_token_id`, `config.codebook_size`,
`config.grid_size`, `config.text_dim` (and `config.pooled_dim` when they read a pooled text vector),
`text_context(states, mask, pooled)` computed once per task, and `forward(tokens, context, positions, grid)`. VQ kinds
have `encode(images in [-1, 1]) -> ids`, `decode(ids) -> images in [-1, 1]`, `config.codebook_size` and
`config.downsample_factor`. A second architecture plugs in here, with no edit to `muse/pipeline.py`.

Classes are imported when a kind is first used, so naming them costs nothing at start-up.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# kind -> (module, class)
KINDS: dict[str, tuple[str, str]] = {
    "vqgan": ("vqgan.model", "VQGAN"),                               # our VQGAN (the emoji models)
    "vqmodel": ("vqgan.vqmodel", "VQModel"),                         # diffusers' VQModel layout (aMUSEd)
    "masked_transformer": ("transformer.model", "MaskedTransformer"),  # Muse's base transformer
    "uvit2d": ("transformer.uvit", "UVit2D"),                        # aMUSEd's U-ViT
    "superres_transformer": ("superres.model", "SuperResTransformer"),
}
ROLES = ("vqgan", "transformer", "superres", "superres_vqgan")
# The kind of each role in directories saved before pipeline.json named kinds (a list of roles).
DEFAULT_KINDS = {"vqgan": "vqgan", "transformer": "masked_transformer", "superres": "superres_transformer",
                 "superres_vqgan": "vqgan"}


def component_class(kind: str) -> type:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def kind_of(component: Any) -> str:
    """The registered kind of a component object (its exact class)."""
    for kind, (module, name) in KINDS.items():
        cls = type(component)
        if cls.__module__ == module and cls.__name__ == name:
            return kind
    raise ValueError(f"{type(component).__name__} is not a registered component kind; add it to muse.components.KINDS")


def load_component(kind: str, path: Path) -> Any:
    """The component of `kind` saved in the directory `path`."""
    return component_class(kind).from_pretrained(path)


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
