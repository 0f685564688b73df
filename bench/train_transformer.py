"""Training throughput, peak memory and MFU of the masked-token stages: tokens/s, GiB and % of the bf16 peak.

Each preset's model is built from its YAML (random weights) the way `muse/train/masked.py` builds it — blocks compiled
with `--compile`, AdamW fused on CUDA, bf16 autocast where `fast_bfloat16` (CUDA, AMX/AVX512-BF16 CPUs; unless `--fp32`), TF32 for what stays float32 — and
trained for `--steps` timed steps after `--warmup` untimed ones by `masked.train_step` itself: super-res corruption,
text dropout, a mask from the shared schedule, the masked loss, AdamW with clipping and the schedule, the EMA update.
The batch is synthetic, shaped as the preset's pre-encoded shards (token grid, text states of the encoder's width and
max length, low-res grid for super-res), and already on the device: data loading is not timed.

MFU is model FLOPs per second over the device's dense bf16 peak (`PEAK_TFLOPS` by device name, or `--peak-tflops`).
The FLOPs are ours, counted by `train_flops` from the model config and each timed step's actual shapes (the last
layer and the head run only at the M positions of the step's mask): every matmul and attention product of the
forward, twice that for the backward, attention without the recomputation a flash backward does.
`tests/bench/test_train_transformer.py` checks the count against torch's FlopCounterMode.
One profiled step reports which scaled-dot-product-attention kernels ran (flash, memory-efficient, cuDNN or math).

Each preset runs in its own process so that peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on the
CPU the process's peak resident set during training (Linux VmHWM, reset after the model is built, so it counts the
weights, optimizer state, EMA copy and activations, but not the interpreter and libraries loaded before).

    python bench/train_transformer.py                                  # tiny + emoji-base + emoji-sr, CPU, 2 threads
    python bench/train_transformer.py --device cuda --presets configs/transformer/muse-632m.yaml --batch-size 64 \\
        --compile --out bench/results/train_transformer-cuda.json

The JSON goes to stdout and, for a full run with default settings (or with --out), to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# The checkout first: `python bench/X.py` puts bench/ itself first on the path, where superres.py would shadow
# the superres package (also when PYTHONPATH already names the checkout, further down).
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse.config import SuperResRun, TransformerRun, load_config  # noqa: E402
from muse.data.sources import TokenBatch  # noqa: E402
from muse.train import masked  # noqa: E402
from muse.train.ema import EMA  # noqa: E402
from muse.train.optim import build_optimizer, build_scheduler  # noqa: E402
from muse.train.runtime import Runtime, autocast, compile_blocks  # noqa: E402
from superres.config import SuperResConfig  # noqa: E402
from superres.model import SuperResTransformer  # noqa: E402
from transformer.config import TransformerConfig  # noqa: E402
from transformer.model import MaskedTransformer  # noqa: E402
from transformer.text import TextEmbedding  # noqa: E402

DEFAULT_PRESETS = ("configs/transformer/tiny.yaml", "configs/transformer/emoji-base.yaml",
                   "configs/superres/emoji-sr.yaml")
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; the first name contained in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,     # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
}


# --------------------------------------------------------------------------------------------------------------------
# FLOPs


def _linear(rows: int, d_in: int, d_out: int) -> int:
    return 2 * rows * d_in * d_out


def _attention(B: int, queries: int, keys: int, D: int) -> int:
    """Scores (Q K^T) and the weighted sum (A V) over all heads: 2 matmuls of B * queries * keys * D multiply-adds."""
    return 4 * B * queries * keys * D


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """One forward's FLOPs."""

    matmul: int       # linear layers (the head included)
    attention: int    # Q K^T and A V products of every self- and cross-attention

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def _stack(t: TransformerConfig, B: int, L: int, M: int, memory: int) -> tuple[int, int]:
    """(matmul, attention) FLOPs of `MaskedTransformer`'s blocks and head: every layer at all L tokens except the
    last, whose queries, cross-attention, MLP and head run at M positions; cross-attention to `memory` entries."""
    D, F = t.width, int(t.width * t.mlp_ratio)
    matmul = t.depth * _linear(B * memory, D, 2 * D)  # cross-attention keys and values, once per batch
    per_token = _linear(1, D, D) * 4 + _linear(1, D, F) * 2  # q, out (self), q, out (cross), MLP: per token row
    matmul += (t.depth - 1) * (B * L * (per_token + _linear(1, D, 2 * D)))  # + self-attention k, v
    matmul += B * L * _linear(1, D, 2 * D) + B * M * per_token  # last layer: k, v at every token
    matmul += _linear(B * M, D, t.codebook_size)  # head
    attention = (t.depth - 1) * (_attention(B, L, L, D) + _attention(B, L, memory, D))
    attention += _attention(B, M, L, D) + _attention(B, M, memory, D)
    return matmul, attention


def forward_flops(cfg: TransformerConfig | SuperResConfig, B: int, S: int, M: int) -> ForwardFlops:
    """FLOPs of one training forward of a batch of B grids with S text positions, logits at M positions per row."""
    if isinstance(cfg, SuperResConfig):
        t, Ll = cfg.high, cfg.low_grid_size**2
        D, F = t.width, int(t.width * t.mlp_ratio)
        low = cfg.low_depth * (_linear(B * Ll, D, 3 * D) + _linear(B * Ll, D, D) + 2 * _linear(B * Ll, D, F))
        low_attention = cfg.low_depth * _attention(B, Ll, Ll, D)
        if cfg.aligned_low:
            low += _linear(B * Ll, D, (cfg.scale**2 if cfg.aligned_subpositions else 1) * D)
        matmul, attention = _stack(t, B, t.grid_size**2, M, memory=Ll + S)
        return ForwardFlops(matmul + low + _linear(B * S, t.text_dim, D), attention + low_attention)
    matmul, attention = _stack(cfg, B, cfg.grid_size**2, M, memory=S)
    return ForwardFlops(matmul + _linear(B * S, cfg.text_dim, cfg.width), attention)


def train_flops(cfg: TransformerConfig | SuperResConfig, B: int, S: int, M: int) -> int:
    """Model FLOPs of one training step: the forward, and twice it for the backward (every product has an input
    gradient and a weight gradient, or two input gradients; even the text projection's input, the LayerNormed text,
    needs one for the norm's weights). The optimizer and the EMA are not counted."""
    return 3 * forward_flops(cfg, B, S, M).total


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The dense bf16 peak of `device` in TFLOP/s: `override`, else the table's entry for the device's name."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark


def synthetic_batch(cfg: TransformerRun | SuperResRun, batch_size: int, device: torch.device) -> TokenBatch:
    """Random ids and text states with the shapes the preset's pre-encoded shards have; text lengths vary per row."""
    high = cfg.model.high if isinstance(cfg, SuperResRun) else cfg.model
    S, L = cfg.text.max_length, high.grid_size**2
    lengths = torch.randint(1, S + 1, (batch_size,))
    text_mask = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    states = torch.randn(batch_size, S, high.text_dim) * text_mask[..., None]  # zero at padding, as the encoder does
    low = None
    if isinstance(cfg, SuperResRun):
        low = torch.randint(0, cfg.model.low_codebook_size, (batch_size, cfg.model.low_grid_size**2))
    tokens = torch.randint(0, high.codebook_size, (batch_size, L))
    return TokenBatch(tokens, states, text_mask, low).to(device)


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def attention_kernels(step, device: torch.device) -> dict[str, int]:
    """Which scaled-dot-product-attention implementations one call of `step` ran, from torch.profiler: the aten op
    names (`..._flash_attention`, `..._efficient_attention`, `..._cudnn_attention`, `..._attention_math`, and
    `..._flash_attention_for_cpu` on the CPU) and, on CUDA, the attention kernels' names, with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    words = ("scaled_dot_product", "flash", "fmha", "efficient_attention", "cudnn_attention", "attention_math")
    counts: Counter[str] = Counter()
    for event in prof.events():
        name = event.name
        if any(word in name.lower() for word in words) and "backward" not in name.lower():
            counts[name] += 1
    return dict(sorted(counts.items()))


def run_preset(path: str, steps: int, warmup: int, batch_size: int | None, device: torch.device, compile_: bool,
               fp32: bool, peak: float | None) -> dict:
    cfg = load_config(path)
    if not isinstance(cfg, (TransformerRun, SuperResRun)):
        raise SystemExit(f"{path}: stage {cfg.stage!r} is not a masked-token stage")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compile_,
                                                             mixed_precision=cfg.train.mixed_precision and not fp32))
    rt = Runtime(device=device, rank=0, world_size=1, local_rank=0)
    if device.type == "cuda" and cfg.train.tf32:
        torch.set_float32_matmul_precision("high")  # as `runtime.setup` does
    torch.manual_seed(0)
    superres = isinstance(cfg, SuperResRun)
    model = (SuperResTransformer(cfg.model) if superres else MaskedTransformer(cfg.model)).to(device).train()
    if compile_:
        compile_blocks(masked.transformer_blocks(model))
    net = masked.StageNet(model)
    B = batch_size or cfg.train.batch_size
    batch = synthetic_batch(cfg, B, device)
    unconditional = TextEmbedding(torch.zeros_like(batch.text_states[:1]), batch.text_mask[:1] & False)
    unconditional.mask[:, 0] = True  # the empty prompt: one real token
    optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    mask_id = cfg.model.mask_token_id
    L = batch.tokens.shape[1]

    def step() -> dict:
        return masked.train_step(cfg, rt, net, model, optimizer, scheduler, ema, batch, unconditional, mask_id)

    for _ in range(warmup):
        step()
    kernels = attention_kernels(step, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")  # interpreter + libraries + model, optimizer and EMA state after warm-up
    times, flops = [], []
    for _ in range(steps):
        start = time.perf_counter()
        stats = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        M = round(stats["queried_fraction"] * L)
        flops.append(train_flops(cfg.model, B, batch.text_states.shape[1], M))
    tokens_per_step = batch.tokens.numel()
    ordered = sorted(times)
    median = ordered[len(ordered) // 2]
    achieved = sum(flops) / sum(times) / 1e12  # over the whole timed stretch: FLOPs vary with each step's mask
    if device.type == "cuda":
        peak_memory = {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    else:
        peak_memory = {"kind": "process peak RSS during training (VmHWM, reset after warm-up)" if rss_reset
                       else "process peak RSS since start (VmHWM; reset not possible here)",
                       "bytes": proc_status_bytes("VmHWM"), "rss_before_timed_steps_bytes": rss_before}
    return {
        "preset": path,
        "stage": cfg.stage,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if isinstance(autocast(rt, cfg.train), torch.autocast) else "float32",
        "compiled_blocks": compile_,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": B,
        "tokens_per_step": tokens_per_step,
        "steps_timed": steps,
        "seconds_per_step_median": median,
        "seconds_per_step_mean": sum(times) / len(times),
        "tokens_per_s": tokens_per_step / median,
        "model_tflop_per_step_mean": sum(flops) / len(flops) / 1e12,
        "achieved_tflops": achieved,
        "peak_tflops_bf16": peak,
        "mfu": None if peak is None else achieved / peak,
        "attention_kernels": kernels,
        "peak_memory": peak_memory | {"gib": None if peak_memory["bytes"] is None else peak_memory["bytes"] / 2**30},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (with --compile: where it compiles)")
    p.add_argument("--batch-size", type=int, default=None, help="default: each preset's train.batch_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (train.compile=true)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (train.mixed_precision=false)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: looked up by device name on CUDA)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one preset, JSON on stdout
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        result = run_preset(args.presets[0], args.steps, args.warmup, args.batch_size, device, args.compile,
                            args.fp32, peak_tflops(device, args.peak_tflops))
        print(json.dumps(result))
        return result

    results = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", "--presets", preset, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads), "--device", args.device]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        cmd += ["--compile"] if args.compile else []
        cmd += ["--fp32"] if args.fp32 else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{preset} failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        gib, before = result["peak_memory"]["gib"], result["peak_memory"].get("rss_before_timed_steps_bytes")
        mfu = "" if result["mfu"] is None else f", MFU {100 * result['mfu']:.1f}%"
        print(f"{preset}: {result['tokens_per_s']:.0f} tokens/s ({result['seconds_per_step_median']:.3f} s/step, "
              f"batch {result['batch_size']}, {result['parameters'] / 1e6:.2f}M params, {result['precision']}), "
              f"{result['achieved_tflops']:.3g} TFLOP/s{mfu}, peak memory "
              f"{'?' if gib is None else f'{gib:.2f} GiB'}"
              f"{'' if before is None else f' ({before / 2**30:.2f} GiB resident before the timed steps)'}; "
              f"attention: {result['attention_kernels']}", file=sys.stderr)
        results.append(result)

    defaults = parse_args([])
    default_run = all(getattr(args, k) == getattr(defaults, k) for k in (
        "presets", "steps", "warmup", "batch_size", "threads", "device", "compile", "fp32", "peak_tflops"))
    report = {
        "benchmark": "bench/train_transformer.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads) | {"device": args.device},
        "settings": {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "compile": args.compile,
                     "fp32": args.fp32},
        "step": "muse.train.masked.train_step: super-res corruption + text dropout + shared-schedule mask + masked "
                "cross-entropy + AdamW (fused on CUDA)/clip/schedule + EMA update, synthetic batches shaped as "
                "pre-encoded shards, already on the device; data loading not timed",
        "flops": "train_flops: matmuls and attention products of forward + backward at each step's shapes, "
                 "no recomputation; optimizer and EMA not counted",
        "results": results,
    }
    write_report(report, "train_transformer", args.out, default_run=default_run)
    return report


if __name__ == "__main__":
    main()
