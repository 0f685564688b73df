"""`muse data tokenize --config CONFIG --out DIR`: encode a dataset once into token + text-state shards.

Every image of the config's training and validation splits is center-cropped to `data.resolution`, tokenized by the
trained VQGAN (`vqgan`; for a super-res config both `vqgan_high` and, from the image downscaled to `low_resolution`,
`vqgan_low`) and its caption encoded by the config's text encoder. Written as

    DIR/<split>/tokens-000000.safetensors ...   one directory per split (train, heldout, ...), see muse.data.tokens
    DIR/unconditional.safetensors               the empty prompt's states, for text dropout

Train from them with `--set data.format=tokens --set data.path=DIR`, so no training step pays for the VQGAN or the
text encoder again. Pre-encoding fixes the crop: training from shards has no random-crop augmentation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from muse.config import ConfigError, SuperResRun, TransformerRun, load_config

# torch and the models are imported where they are used, so that `muse data tokenize --help` starts at once.
if TYPE_CHECKING:
    import torch

    from muse.data.sources import Tokenizers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="a transformer or superres preset whose `data` names the images to encode")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.path=data/emoji (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded per forward pass")
    parser.add_argument("--items-per-shard", type=int, default=4096, help="items per safetensors shard file")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output directory")


def main(args: argparse.Namespace) -> None:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        raise SystemExit(f"muse data tokenize: {error}") from None
    if not isinstance(cfg, (TransformerRun, SuperResRun)):
        raise SystemExit(f"muse data tokenize: {args.config} is a {cfg.stage} config; give a transformer or superres one")
    if cfg.data.format == "tokens":
        raise SystemExit("muse data tokenize: the config's data is already tokens; point it at the images with "
                         "--set data.format=folder --set data.path=DIR")
    import torch

    from muse.data.sources import Tokenizers, has_validation, save_unconditional

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizers = Tokenizers.load(cfg, device)
    splits = {cfg.data.split or "all": True}
    if has_validation(cfg.data):
        splits[cfg.data.val_split or "all"] = False
    for split, train in splits.items():
        count = tokenize_split(cfg, tokenizers, split, train, args.out / split, device, args)
        print(f"{split}: {count} items -> {args.out / split}")
    save_unconditional(args.out, tokenizers.unconditional(), cfg.text)
    print(f"train from them with: muse train {args.config} --set data.format=tokens --set data.path={args.out}")


def tokenize_split(cfg: TransformerRun | SuperResRun, tokenizers: Tokenizers, split: str, train: bool,
                   out: Path, device: torch.device, args: argparse.Namespace) -> int:
    """Encode one split into shards under `out`; returns the number of items written."""
    import torch
    from torch.utils.data import DataLoader
    from muse.data.sources import image_dataset
    from muse.data.tokens import TokenShardWriter
    from muse.progress import progress

    # Center crops for every split: the shards are a fixed encoding of the data set.
    dataset = image_dataset(replace(cfg.data, crop="center"), train=train, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    h = cfg.data.resolution // tokenizers.high.config.downsample_factor
    low_h = None
    if tokenizers.low is not None:
        low_h = tokenizers.low_resolution // tokenizers.low.config.downsample_factor
    with TokenShardWriter(out, items_per_shard=args.items_per_shard, overwrite=args.overwrite) as writer:
        total = len(dataset) if hasattr(dataset, "__len__") else None
        for items in progress(None if total is None else len(loader), desc=f"tokenize {split}", unit="batch",
                              iterable=loader):
            with torch.no_grad():
                batch = tokenizers.encode(items["image"].to(device), list(items["caption"]))
            B = len(batch)
            writer.add(
                keys=list(items["key"]),
                captions=list(items["caption"]),
                tokens=batch.tokens.view(B, h, h),
                text_states=batch.text_states,
                text_mask=batch.text_mask,
                low_res_tokens=None if low_h is None else batch.low_tokens.view(B, low_h, low_h),
            )
    return writer.num_items


__all__ = ["add_arguments", "main", "tokenize_split"]
