"""Datasets: image folders, webdataset shards, pre-encoded token shards, and the emoji builder.

    from muse.data import ImageCaptionDataset, ImageTransform
    data = ImageCaptionDataset("data/emoji", ImageTransform(64, resize=72, crop="random"), split="train")
    data[0]  # {"image": (3, 64, 64) float in [-1, 1], "caption": "grinning face, noto style", "key": "noto/..."}
"""

# name -> defining module. Imported lazily so `muse data emoji` does not pay for importing torch.
_EXPORTS = {
    "ImageTransform": "muse.data.images",
    "ImageCaptionDataset": "muse.data.folder",
    "WebDatasetImages": "muse.data.streaming",
    "write_webdataset_shards": "muse.data.streaming",
    "TokenShardWriter": "muse.data.tokens",
    "TokenShardDataset": "muse.data.tokens",
    "build_emoji_dataset": "muse.data.emoji",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'muse.data' has no attribute {name!r}")
