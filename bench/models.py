"""Time per image of whole models at their own shipped defaults, side by side in one run.

Each model is a pipeline directory (or a bundled preset name) and generates at the sampling defaults of its own
`pipeline.json` (best-of-N, stages, steps, precision: what `muse generate` does with no options), through the same
`MusePipeline.__call__` every entry point uses. The models take turns rep by rep, so a change in the machine's load
touches all of them alike; the median per model is reported, and every ratio is against the first model.

    python bench/models.py --models runs/bundle-v0.3 default     # v0.3 against the bundled model
    python bench/models.py --models default --reps 1 --batch 2   # smoke run (stdout only)

Run it on a quiet machine: every number here is wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse.pipeline import MusePipeline  # noqa: E402

# Training and held-out concepts alike; the time per image does not depend on which.
PROMPTS = ["red apple, noto style", "grinning face, twemoji style", "fire, fluent style", "rainbow, noto style",
           "ghost, twemoji style", "penguin, fluent style", "crown, noto style", "cat face, twemoji style"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="pipeline directories or bundled preset names")
    parser.add_argument("--batch", type=int, default=16, help="images per call (default: 16)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per model, the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/ for a full run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {name: MusePipeline.from_pretrained(name) for name in args.models}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    for pipe in pipes.values():  # warm-up: first-call allocations, the scorer's and the text encoder's caches
        pipe(prompts[:2], seed=0)
    seconds = {name: [] for name in pipes}
    for rep in range(args.reps):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe(prompts, seed=rep)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name} rep {rep}: {seconds[name][-1] / args.batch:.3f} s/image", file=sys.stderr)
    first = args.models[0]
    per_image = {name: statistics.median(s) / args.batch for name, s in seconds.items()}
    report = {
        "benchmark": "models",
        "machine": machine_info(args.threads),
        "batch": args.batch,
        "reps": args.reps,
        "models": {
            name: {
                "defaults": dataclasses.asdict(pipe.config.sampling) | {"precision": pipe.config.precision},
                "seconds_per_image_median": per_image[name],
                "calls_s": seconds[name],
                "ratio_to_first": per_image[name] / per_image[first],
            }
            for name, pipe in pipes.items()
        },
    }
    write_report(report, "models", args.out, default_run=args.reps == 3 and args.batch == 16)


if __name__ == "__main__":
    main()
