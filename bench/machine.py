"""What every benchmark records about the machine it ran on, and the fp32 matmul peak measured in the same run.

Imported as `machine` by the scripts in bench/ (run as `python bench/<script>.py`, which puts bench/ on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch


def machine_info(threads: int) -> dict:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    except OSError:
        pass
    return {
        "cpu_model": fields.get("model name", "unknown"),
        "cpu_mhz": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
        "physical_cores_per_socket": int(fields["cpu cores"]) if "cpu cores" in fields else None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()),
    }


def measure_matmul_peak(sizes: tuple[int, ...], reps: int) -> dict:
    """Best fp32 GFLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) with the current thread count.

    The best over reps and sizes is the "peak": it is what this BLAS reaches on this machine right now, so a loaded
    machine lowers both the peak and the model's throughput instead of only the latter.
    """
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up: thread pool spin-up, page faults on `out`
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        per_size[str(n)] = 2 * n**3 / best / 1e9
    return {"method": "best of torch.mm fp32 n x n, 2 n^3 FLOPs", "reps": reps, "gflops_by_size": per_size,
            "gflops": max(per_size.values()), "load_average": list(os.getloadavg())}


RESULTS = Path(__file__).resolve().parent / "results"


def write_report(report: dict, name: str, out: Path | None, default_run: bool) -> None:
    """Print the JSON report to stdout and write it to `out`, or, for a full run with default settings, to
    bench/results/<name>-<time>.json: smoke and overridden runs never land there by accident."""
    text = json.dumps(report, indent=2)
    if out is None and default_run:
        out = RESULTS / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    print(text)
