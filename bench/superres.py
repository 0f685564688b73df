"""Cost of the super-resolution stage relative to the base stage, measured side by side in one run.

Muse's cascade decodes the base grid in 24 steps and then a 4x (or 16x) larger grid in 8 super-res steps. This times
both stages of one cascade call, `pipe(prompts, stages=2)`, through the pipeline and its decoding engine (only the
text encoder and the VQ are stand-ins, bench/pipelines.py), on random weights, and reports seconds per image of each
stage and their ratio. Target: super-res (8 steps) <= 1.5x the base stage (24 steps) at 4x the tokens.

Pairs (each a base model and the super-res model that follows it):
  emoji      the bundled presets: configs/transformer/emoji-base.yaml (8x8) -> configs/superres/emoji-sr.yaml (16x16)
  bench-256  bench/sample.py's base shapes (16x16, K=8192, width 512, 8 layers, 77 text tokens of width 768) ->
             a 32x32 super-res model of the same width in Muse's proportions: Muse-3B's base has 48 layers and its
             super-res 16 low-res + 32 high-res layers, so here 3 low-res + 6 high-res layers (rounded up from 2.7
             and 5.3) for the base's 8
  bench-256-matched  the same, but the super-res high-res stack as deep as the base (8 layers, 4 low-res): the
             plain cost of 4x the tokens at equal depth

    python bench/superres.py                      # full run; writes bench/results/superres-<time>.json
    python bench/superres.py --reps 1 --batch 2   # smoke run (not written unless --out)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# The checkout first: `python bench/X.py` puts bench/ itself first on the path, where superres.py would shadow
# the superres package (also when PYTHONPATH already names the checkout, further down).
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse.config import load_config  # noqa: E402
from muse.engine import Step  # noqa: E402
from pipelines import bench_pipeline  # noqa: E402  (bench/pipelines.py)
from superres.config import SuperResConfig  # noqa: E402
from superres.model import SuperResTransformer  # noqa: E402
from transformer.config import TransformerConfig  # noqa: E402
from transformer.model import MaskedTransformer  # noqa: E402

TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Pair:
    name: str
    base: TransformerConfig
    superres: SuperResConfig
    text_length: int


def bench_256_pair(high_depth: int, low_depth: int, name: str) -> Pair:
    def config(grid: int, depth: int) -> TransformerConfig:
        return TransformerConfig(codebook_size=8192, grid_size=grid, width=512, depth=depth, num_heads=8,
                                 mlp_ratio=4.0, text_dim=768)

    sr = SuperResConfig(high=config(32, high_depth), low_codebook_size=8192, low_grid_size=16, low_depth=low_depth,
                         aligned_low=True, aligned_subpositions=True)
    return Pair(name, config(16, 8), sr, 77)


def emoji_pair() -> Pair:
    base = load_config(REPO / "configs/transformer/emoji-base.yaml")
    sr = load_config(REPO / "configs/superres/emoji-sr.yaml")
    return Pair("emoji", base.model, sr.model, base.text.max_length)


class Stages:
    """Both stages of one pair with random weights in one `MusePipeline` (bench/pipelines.py: only the text encoder
    and the VQ are stand-ins), run as the cascade: `pipe(prompts, stages=2)`. Each call's time is split at the
    engine's last step of the base stage's job: base = the call up to there, super-res = the rest (its text and
    low-res memory, its decode)."""

    def __init__(self, pair: Pair, batch: int, guidance_scale: float) -> None:
        torch.manual_seed(0)
        self.pair, self.batch, self.guidance_scale = pair, batch, guidance_scale
        base = MaskedTransformer(pair.base).eval()
        superres = SuperResTransformer(pair.superres).eval()
        self.pipe = bench_pipeline(base, superres, text_length=pair.text_length)
        self.prompts = [f"prompt {i}" for i in range(batch)]

    def run(self, base_steps: int, sr_steps: int) -> tuple[float, float]:
        """Seconds of (base stage, super-res stage) of one cascade call."""
        marks: dict[int, float] = {}

        def listen(event) -> None:
            if isinstance(event, Step):
                marks[event.job] = time.perf_counter()  # the last step of each job wins

        task = self.pipe.task(self.pipe.request(
            "generate", self.prompts, seed=list(range(self.batch)), stages=2, num_candidates=1, num_steps=base_steps,
            superres_steps=sr_steps, guidance_scale=self.guidance_scale))
        start = time.perf_counter()
        self.pipe.engine.run(task, on_event=listen)
        end = time.perf_counter()
        return marks[0] - start, end - marks[0]


def measure(pair: Pair, batch: int, guidance_scale: float, base_steps: int, sr_steps: int, reps: int) -> dict:
    stages = Stages(pair, batch, guidance_scale)
    stages.run(2, 1)  # warm-up of both paths
    base_times, sr_times = [], []
    for _ in range(reps):
        base_s, sr_s = stages.run(base_steps, sr_steps)
        base_times.append(base_s)
        sr_times.append(sr_s)
    base_s, sr_s = statistics.median(base_times), statistics.median(sr_times)
    high, low = pair.superres.high.grid_size ** 2, pair.base.grid_size ** 2
    return {
        "pair": pair.name,
        "batch": batch,
        "guidance_scale": guidance_scale,
        "base": {"grid": pair.base.grid_size, "tokens": low, "steps": base_steps, "width": pair.base.width,
                 "depth": pair.base.depth, "seconds_per_call": base_s, "seconds_per_image": base_s / batch,
                 "runs": base_times},
        "superres": {"grid": pair.superres.high.grid_size, "tokens": high, "steps": sr_steps,
                     "width": pair.superres.high.width, "depth": pair.superres.high.depth,
                     "low_depth": pair.superres.low_depth, "seconds_per_call": sr_s,
                     "seconds_per_image": sr_s / batch, "runs": sr_times},
        "token_ratio": high / low,
        "cost_ratio": sr_s / base_s,
        "target": TARGET_RATIO,
        "met": sr_s / base_s <= TARGET_RATIO,
    }


PAIRS = {
    "emoji": emoji_pair,
    "bench-256": lambda: bench_256_pair(high_depth=6, low_depth=3, name="bench-256"),
    "bench-256-matched": lambda: bench_256_pair(high_depth=8, low_depth=4, name="bench-256-matched"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--base-steps", type=int, default=24)
    p.add_argument("--superres-steps", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.pairs:
        r = measure(PAIRS[name](), args.batch, args.guidance_scale, args.base_steps, args.superres_steps, args.reps)
        print(f"{name}: base {r['base']['tokens']} tokens x {r['base']['steps']} steps "
              f"{r['base']['seconds_per_image']:.3f} s/image; super-res {r['superres']['tokens']} tokens x "
              f"{r['superres']['steps']} steps {r['superres']['seconds_per_image']:.3f} s/image; "
              f"ratio {r['cost_ratio']:.2f}x (target <= {TARGET_RATIO}x: {'met' if r['met'] else 'NOT met'})",
              file=sys.stderr)
        results.append(r)
    report = {
        "benchmark": "bench/superres.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "settings": vars(args) | {"out": None, "dtype": "float32", "device": "cpu"},
        "timed_region": "one cascade call through MusePipeline and its engine, split at the base job's last step; "
                        "text encoder (random states) and VQ decode (none) excluded; random weights",
        "results": results,
    }
    write_report(report, "superres", args.out, default_run=vars(args) == vars(parse_args([])))
    return report


if __name__ == "__main__":
    main()
