"""`muse train CONFIG [--resume] [--set key=value ...] [--out-dir DIR]`: train the stage named by the config.

    muse train configs/vqgan/emoji-f8.yaml
    muse train configs/transformer/emoji-base.yaml --set train.lr=3e-4 --set data.format=tokens \\
        --set data.path=data/emoji-tokens
    torchrun --nproc_per_node 2 -m muse.train.run configs/vqgan/emoji-f8.yaml   # DDP, one process per device
    torchrun --nproc_per_node 8 -m muse.cli train configs/transformer/muse-3b.yaml --set train.parallel=fsdp
    muse train configs/scorer/emoji.yaml

`--resume` continues exactly from the run's latest checkpoint (the one `checkpoints/last.json` names, or the
`checkpoints/last.pt` of an earlier musegen) and starts fresh when there is none yet, so the same command serves the
first launch and every restart. The loops: `muse/train/vqgan.py`, `muse/train/masked.py` (base transformer and
super-res), `muse/train/scorer.py`; what they share: the other modules of `muse/train/` (`runtime.py`,
`checkpoint.py`, `ema.py`, `optim.py`, `batches.py`, `logger.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from pathlib import Path

from muse.config import ConfigError, ScorerConfig, ScorerDataConfig, ScorerRun, ScorerTrainConfig, load_config

# stage -> module with `train(cfg, resume, keep_every) -> Path`; imported only for the stage being trained.
TRAINERS = {"vqgan": "muse.train.vqgan", "transformer": "muse.train.masked", "superres": "muse.train.masked",
            "scorer": "muse.train.scorer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML preset, e.g. configs/vqgan/emoji-f8.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's latest checkpoint in out_dir/checkpoints/ (start fresh if there is "
                             "none yet)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted path, e.g. --set train.lr=2e-4 (repeatable)")
    parser.add_argument("--out-dir", type=str, default=None, help="shortcut for --set train.out_dir=DIR")
    parser.add_argument("--keep-every", type=int, default=None, metavar="N",
                        help="also keep a copy of the checkpoint written at every N-th step (checkpoints are "
                             "written every train.save_every steps, so N should be a multiple of it; the latest is "
                             "always kept) (default: none)")


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
    from muse.train.checkpoint import LAST, LEGACY_LAST, CheckpointError, checkpoint_dir

    checkpoints = checkpoint_dir(Path(cfg.train.out_dir))
    if not args.resume and any((checkpoints / name).exists() for name in (LAST, LEGACY_LAST)):
        raise SystemExit(f"muse train: {cfg.train.out_dir} holds a run already (checkpoints/); pass --resume to "
                         "continue it, or give another train.out_dir (--out-dir) to start a new one")
    trainer = importlib.import_module(TRAINERS[cfg.stage])

    try:
        exported = trainer.train(cfg, resume=args.resume, keep_every=args.keep_every)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        # The user's inputs (paths, data, checkpoints, init_from) explain these; a traceback would not.
        raise SystemExit(f"muse train: {error}") from None
    if os.environ.get("RANK", "0") == "0":
        print(f"exported {cfg.stage} model to {exported}")


# --------------------------------------------------------------------------------------------------------------------
# `muse scorer --data DIR --out DIR [...]`: a scorer run as `muse train configs/scorer/emoji.yaml` makes it, from flags
# (their defaults are the config dataclasses').

_TRAIN, _DATA = ScorerTrainConfig(out_dir=""), ScorerDataConfig(path="")


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="image-caption folder (train split)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the scorer is saved")
    parser.add_argument("--steps", type=int, default=_TRAIN.steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=_TRAIN.batch_size, help="pairs per contrastive batch")
    parser.add_argument("--lr", type=float, default=_TRAIN.lr, help="AdamW learning rate")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(_DATA.source_sizes), metavar="PX",
                        help="source renderings used as views of each image")
    parser.add_argument("--image-size", type=int, default=ScorerConfig.image_size, metavar="PX",
                        help="side every image is resized to before the image tower")
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help="frozen-feature cache (default: OUT/feature-cache)")
    parser.add_argument("--max-images", type=int, default=_DATA.max_images, metavar="N",
                        help="at most N images of each split, a fixed random subset (feature extraction costs about "
                             "0.1 s per image and view on 2 CPU cores; default: every image)")
    parser.add_argument("--seed", type=int, default=_TRAIN.seed, help="seed of the heads and the batches")
    parser.add_argument("--device", default=_TRAIN.device, help="cpu, cuda, ...")


def scorer_main(args: argparse.Namespace) -> None:
    from muse.train.scorer import fit

    try:
        cfg = ScorerRun(
            data=ScorerDataConfig(str(args.data), tuple(args.sizes), None if args.cache is None else str(args.cache),
                                  args.max_images),
            train=dataclasses.replace(_TRAIN, out_dir=str(args.out), steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, seed=args.seed, device=args.device),
            model=ScorerConfig(image_size=args.image_size),
        )
        result = fit(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"muse scorer: {e}") from None
    held = result.heldout
    held_text = "no held-out split" if held is None else \
        f"held-out top-1 {held.top1:.3f}, top-5 {held.top5:.3f} among {held.num_candidates} captions"
    print(f"scorer saved to {args.out} in {result.seconds:.0f} s: loss {result.final_loss:.4f}; train top-1 "
          f"{result.train.top1:.3f}; {held_text}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m muse.train.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
