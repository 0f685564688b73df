"""Cost of the super-resolution stage relative to the base stage, measured side by side in one run.

Muse's cascade decodes the base grid in 24 steps and then a 4x (or 16x) larger grid in 8 super-res steps. This times
both stages as the pipeline runs them — the text (and, for super-res, the low-res memory) turned into cross-attention
keys/values once per call, classifier-free guidance batched into one forward, logits only at still-masked positions,
`sampling.decode` with the pipeline's schedule — on random weights, and reports seconds per image of each stage and
their ratio. Target: super-res (8 steps) <= 1.5x the base stage (24 steps) at 4x the tokens.

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
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
# The checkout first: `python bench/X.py` puts bench/ itself first on the path, where superres.py would shadow
# the superres package (also when PYTHONPATH already names the checkout, further down).
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse.config import load_config  # noqa: E402
from muse.pipeline import PipelineConfig, guided_logits_fn  # noqa: E402
from sampling import decode  # noqa: E402
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
    """Both stages of one pair with random weights, and the random text states standing in for the encoder."""

    def __init__(self, pair: Pair, batch: int, guidance_scale: float) -> None:
        torch.manual_seed(0)
        self.pair, self.batch, self.guidance_scale = pair, batch, guidance_scale
        self.base = MaskedTransformer(pair.base).eval()
        self.superres = SuperResTransformer(pair.superres).eval()
        S, Dt = pair.text_length, pair.base.text_dim
        rows = 2 * batch if guidance_scale > 1 else batch  # [conditional; unconditional] rows
        self.states = torch.randn(rows, S, Dt)  # (rows, S, Dt)
        self.mask = torch.ones(rows, S, dtype=torch.bool)
        self.mask[batch:, 1:] = guidance_scale <= 1  # unconditional rows: the empty prompt, one real token
        defaults = PipelineConfig()
        self.schedule, self.choice_temperature = defaults.mask_schedule, defaults.choice_temperature
        self.low = self.run_base(2)  # a low-res grid for super-res to condition on

    def _decode(self, model, context, grid_size: int, num_steps: int) -> Tensor:
        base = isinstance(model, MaskedTransformer)
        mask_id = model.config.mask_token_id if base else model.high.config.mask_token_id
        grid = (grid_size, grid_size)
        # The base stage's text rows named as the pipeline names them (B prompts, then the empty prompt for every
        # row), so its all-masked first step runs the distinct rows only; super-res rows also differ in their low-res
        # grids, and the pipeline names none of them.
        keys = [f"prompt {i}" for i in range(self.batch)] + ([""] * self.batch if self.guidance_scale > 1 else [])
        logits_fn = guided_logits_fn(model, context, grid, self.guidance_scale, row_keys=keys if base else None)
        tokens = torch.full((self.batch, grid_size * grid_size), mask_id, dtype=torch.long)  # (B, L) all masked
        out = decode(tokens, logits_fn, mask_token_id=mask_id, seeds=torch.arange(self.batch), num_steps=num_steps,
                     schedule=self.schedule, choice_temperature=self.choice_temperature)
        return out.tokens

    @torch.inference_mode()
    def run_base(self, num_steps: int) -> Tensor:
        context = self.base.text_context(self.states, self.mask)
        return self._decode(self.base, context, self.pair.base.grid_size, num_steps)

    @torch.inference_mode()
    def run_superres(self, num_steps: int) -> Tensor:
        low = torch.cat([self.low, self.low]) if self.guidance_scale > 1 else self.low  # (rows, Ll)
        context = self.superres.context(low, self.states, self.mask)
        return self._decode(self.superres, context, self.pair.superres.high.grid_size, num_steps)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(pair: Pair, batch: int, guidance_scale: float, base_steps: int, sr_steps: int, reps: int) -> dict:
    stages = Stages(pair, batch, guidance_scale)
    stages.run_superres(1)  # warm-up of both paths (the base one ran in __init__)
    base_times, sr_times = [], []
    for rep in range(reps):  # interleaved, the order alternating, so drifting machine load is shared
        order = [("base", stages.run_base, base_steps), ("superres", stages.run_superres, sr_steps)]
        for name, fn, steps in order if rep % 2 == 0 else order[::-1]:
            (base_times if name == "base" else sr_times).append(timed(fn, steps))
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
        "timed_region": "per stage: text (+ low-res memory) -> cross-attention K/V once, then sampling.decode with "
                        "batched guidance; text encoder and VQ decode excluded; random weights",
        "results": results,
    }
    write_report(report, "superres", args.out, default_run=vars(args) == vars(parse_args([])))
    return report


if __name__ == "__main__":
    main()
