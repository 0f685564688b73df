"""`muse convert`: a pipeline from another layout -- a diffusers aMUSEd directory or hub id -- as a musegen pipeline
directory, which then loads without the original's layout (and offline, once written).

    muse convert amused/amused-256 --out models/amused-256 --weights-dtype float16   # internet once (the download)
    muse generate "a red apple" --model models/amused-256

aMUSEd's weights are published under the OpenRAIL++-M licence (their model card); a converted copy is still theirs
and under it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from muse.options import deprecated_alias

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a diffusers aMUSEd directory (with model_index.json), a Hugging Face hub id "
                                       "such as amused/amused-256, or a musegen pipeline directory")
    parser.add_argument("--out", type=Path, required=True, help="the musegen pipeline directory to write")
    parser.add_argument("--weights-dtype", dest="dtype", choices=DTYPES, default=None,
                        help="storage dtype of the weights (default: as loaded, float32); loading casts back, and "
                             "the arithmetic is the model's precision")
    # `muse assemble`'s name for the same thing; --dtype was this flag's name, kept with a warning for one version.
    deprecated_alias(parser, "--dtype", "--weights-dtype", dest="dtype", choices=DTYPES, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace a pipeline already at --out")


def main(args: argparse.Namespace) -> None:
    import torch

    from muse.assemble import write_fresh
    from muse.pipeline import MusePipeline

    try:
        pipe = MusePipeline.from_pretrained(args.source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"muse convert: {e}") from None
    write_fresh(pipe, args.out, None if args.dtype is None else getattr(torch, args.dtype), args.overwrite,
                "convert")
    parts = ", ".join(f"{role} ({type(getattr(pipe, role)).__name__})" for role in ("vqgan", "transformer", "superres")
                      if getattr(pipe, role) is not None)
    print(f"muse convert: wrote {args.out}: {parts}; load it with MusePipeline.from_pretrained({str(args.out)!r}) "
          f"or --model {args.out}")
