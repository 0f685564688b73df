"""musegen: Muse-style text-to-image generation.

    from muse import MusePipeline
    pipe = MusePipeline.from_pretrained()
    out = pipe("a red apple", num_images=4, seed=0)
    out.images[0].save("apple.png")
"""

__version__ = "0.1.0"
__all__ = ["MusePipeline", "PipelineOutput"]


def __getattr__(name: str):
    # Imported lazily so `import muse` (and `muse --help`) stays fast and does not load every model.
    if name in __all__:
        from muse import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'muse' has no attribute {name!r}")
