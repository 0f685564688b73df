"""`muse train CONFIG [--resume] [--set key=value ...] [--out-dir DIR]`: train the stage named by the config.

    muse train configs/vqgan/emoji-f8.yaml
    muse train configs/transformer/emoji-base.yaml --set train.lr=3e-4 --set data.format=tokens \\
        --set data.path=data/emoji-tokens
    torchrun --nproc_per_node 2 -m muse.train.run configs/vqgan/emoji-f8.yaml   # DDP, one process per device
    torchrun --nproc_per_node 8 -m muse.cli train configs/transformer/muse-3b.yaml --set train.parallel=fsdp
    muse train configs/scorer/emoji.yaml

`--resume` continues exactly from the run's latest checkpoint (`checkpoints/last.pt`, or under FSDP the sharded one
`checkpoints/last.json` names) and starts fresh when there is none yet, so the same command serves the first launch
and every restart. The loops: `muse/train/vqgan.py`, `muse/train/masked.py` (base transformer and super-res),
`muse/train/scorer.py`; what they share: `muse/train/runtime.py`.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from muse.config import ConfigError, load_config

# stage -> module with `train(cfg, resume, keep_every) -> Path`; imported only for the stage being trained.
TRAINERS = {"vqgan": "muse.train.vqgan", "transformer": "muse.train.masked", "superres": "muse.train.masked",
            "scorer": "muse.train.scorer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML preset, e.g. configs/vqgan/emoji-f8.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from out_dir/checkpoints/last.pt (start fresh if there is none yet)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted path, e.g. --set train.lr=2e-4 (repeatable)")
    parser.add_argument("--out-dir", type=str, default=None, help="shortcut for --set train.out_dir=DIR")
    parser.add_argument("--keep-every", type=int, default=None, metavar="N",
                        help="also keep a copy of the checkpoint every N steps (last.pt is always kept)")


def main(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.out_dir is not None:
        overrides.append(f"train.out_dir={args.out_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        raise SystemExit(f"muse train: {error}") from None
    if args.keep_every is not None and args.keep_every < 1:
        raise SystemExit("muse train: --keep-every must be >= 1")
    trainer = importlib.import_module(TRAINERS[cfg.stage])
    exported = trainer.train(cfg, resume=args.resume, keep_every=args.keep_every)
    if os.environ.get("RANK", "0") == "0":
        print(f"exported {cfg.stage} model to {exported}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m muse.train.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
