"""Training throughput and peak memory of the masked-token stages: tokens/s and peak memory per preset.

Each preset's model is built from its YAML (random weights) and trained for `--steps` timed steps after `--warmup`
untimed ones, on synthetic token batches shaped as its pre-encoded shards are (token grid, text states of the
preset's encoder width and max length, low-res grid for super-res). A step is exactly the training loop's: text
dropout, a mask from the shared schedule, the masked loss over the stage's forward, AdamW with clipping and the
schedule, the EMA update. Data loading is not timed (pre-encoded shards make it negligible).

Each preset runs in its own process so that peak memory is its own: on CUDA `torch.cuda.max_memory_allocated`, on the
CPU the process's peak resident set during training (Linux VmHWM, reset after the model is built, so it counts the
weights, optimizer state, EMA copy and activations, but not the interpreter and libraries loaded before).

    python bench/train_transformer.py                                  # tiny + emoji-base + emoji-sr, CPU, 2 threads
    python bench/train_transformer.py --presets configs/transformer/muse-632m.yaml --device cuda --batch-size 64

The JSON goes to stdout and, for a full run with default settings (or with --out), to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
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
from muse.train.masked import StageNet, masked_loss, text_dropout, training_mask  # noqa: E402
from muse.train.runtime import EMA, build_optimizer, build_scheduler, step_optimizer  # noqa: E402
from superres.model import SuperResTransformer  # noqa: E402
from transformer.model import MaskedTransformer  # noqa: E402
from transformer.text import TextEmbedding  # noqa: E402

DEFAULT_PRESETS = ("configs/transformer/tiny.yaml", "configs/transformer/emoji-base.yaml",
                   "configs/superres/emoji-sr.yaml")


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


def run_preset(path: str, steps: int, warmup: int, batch_size: int | None, device: torch.device) -> dict:
    cfg = load_config(path)
    torch.manual_seed(0)
    if isinstance(cfg, SuperResRun):
        model = SuperResTransformer(cfg.model)
        net = StageNet(model)
        mask_id = cfg.model.high.mask_token_id
    elif isinstance(cfg, TransformerRun):
        model = MaskedTransformer(cfg.model)
        net = StageNet(model)
        mask_id = cfg.model.mask_token_id
    else:
        raise SystemExit(f"{path}: stage {cfg.stage!r} is not a masked-token stage")
    model.to(device).train()
    B = batch_size or cfg.train.batch_size
    batch = synthetic_batch(cfg, B, device)
    unconditional = TextEmbedding(torch.zeros_like(batch.text_states[:1]), batch.text_mask[:1] & False)
    unconditional.mask[:, 0] = True  # the empty prompt: one real token
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None

    def step() -> None:
        b = text_dropout(batch, unconditional, cfg.masking.text_dropout)
        mask = training_mask(b, cfg.masking)
        out = masked_loss(net, b, mask, mask_id, cfg.masking.label_smoothing)
        step_optimizer(out.loss, optimizer, scheduler, cfg.train.grad_clip)
        if ema is not None:
            ema.update(model)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_reset = reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")  # interpreter + libraries + model, optimizer and EMA state after warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens_per_step = batch.tokens.numel()
    times.sort()
    median = times[len(times) // 2]
    if device.type == "cuda":
        peak = {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    else:
        peak = {"kind": "process peak RSS during training (VmHWM, reset after warm-up)" if rss_reset
                else "process peak RSS since start (VmHWM; reset not possible here)",
                "bytes": proc_status_bytes("VmHWM"), "rss_before_timed_steps_bytes": rss_before}
    return {
        "preset": path,
        "stage": cfg.stage,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": B,
        "tokens_per_step": tokens_per_step,
        "steps_timed": steps,
        "seconds_per_step_median": median,
        "seconds_per_step_mean": sum(times) / len(times),
        "tokens_per_s": tokens_per_step / median,
        "peak_memory": peak | {"mib": None if peak["bytes"] is None else peak["bytes"] / 2**20},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: each preset's train.batch_size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one preset, JSON on stdout
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        result = run_preset(args.presets[0], args.steps, args.warmup, args.batch_size, device)
        print(json.dumps(result))
        return result

    results = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", "--presets", preset, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads), "--device", args.device]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{preset} failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        mib, before = result["peak_memory"]["mib"], result["peak_memory"].get("rss_before_timed_steps_bytes")
        print(f"{preset}: {result['tokens_per_s']:.0f} tokens/s ({result['seconds_per_step_median']:.3f} s/step, "
              f"batch {result['batch_size']}, {result['parameters'] / 1e6:.2f}M params), peak memory "
              f"{'?' if mib is None else f'{mib:.0f} MiB'}"
              f"{'' if before is None else f' ({before / 2**20:.0f} MiB resident before the timed steps)'}",
              file=sys.stderr)
        results.append(result)

    defaults = parse_args([])
    default_run = all(getattr(args, k) == getattr(defaults, k) for k in ("presets", "steps", "warmup", "batch_size",
                                                                          "threads", "device"))
    report = {
        "benchmark": "bench/train_transformer.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads) | {"device": args.device},
        "settings": {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "dtype": "float32"},
        "step": "text dropout + shared-schedule mask + masked cross-entropy + AdamW/clip/schedule + EMA update, "
                "synthetic batches shaped as pre-encoded shards; data loading not timed",
        "results": results,
    }
    write_report(report, "train_transformer", args.out, default_run=default_run)
    return report


if __name__ == "__main__":
    main()
