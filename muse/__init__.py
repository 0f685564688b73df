"""musegen: Muse-style text-to-image generation.

    from muse import MusePipeline
    pipe = MusePipeline.from_pretrained()
    out = pipe("a red apple", num_images=4, seed=0)
    out.images[0].save("apple.png")

Each task is also a value (`muse.requests`): `pipe.submit(InpaintRequest(...))` starts it without waiting.
"""

import importlib

__version__ = "0.1.0"
# name -> the module that defines it
_EXPORTS = {
    "MusePipeline": "muse.pipeline",
    "PipelineOutput": "muse.pipeline",
    "GenerateRequest": "muse.requests",
    "InpaintRequest": "muse.requests",
    "OutpaintRequest": "muse.requests",
    "EditRequest": "muse.requests",
    "UpscaleRequest": "muse.requests",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Imported lazily so `import muse` (and `muse --help`) stays fast and does not load every model.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'muse' has no attribute {name!r}")
