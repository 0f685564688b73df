"""One progress bar for everything a user waits on: data building, tokenizing, feature extraction, evaluation,
batch generation. It shows a rate and an ETA on stderr when stderr is a terminal and stays silent otherwise, so
logs, pipes and CI get no carriage-return noise; `disable=True` turns it off everywhere."""

from __future__ import annotations

import sys
from typing import Any


def progress(total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0,
             disable: bool | None = None, **options: Any):
    """A `tqdm` bar over `total` units (None: a counter without an ETA). `disable=None` means "only on a terminal"."""
    from tqdm.auto import tqdm  # imported here: `muse --help` and the lazy CLI paths import no tqdm

    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **options)


__all__ = ["progress"]
