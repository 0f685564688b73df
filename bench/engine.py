"""The decoding engine under load, with the bundled model: concurrent jobs against the same work run one after
another and as batched calls, measured side by side in one run; and the latency of one interactive request.

Part 1, interactive latency: one request at a time, in-process, one candidate: a generation and an inpainting edit
of a 25% hole (the centre half of each side), `--latency-runs` each, p50 / p95, in float32 and in the precision the
model's `config.precision` chooses on this CPU ("auto": bfloat16 where the CPU multiplies it fast).

Part 2, throughput: for each concurrency level k (1 4 16 64), the same mixed work -- `--jobs-per-client` jobs for
each of k clients, alternately a generation and an inpainting edit of a 25% hole, one candidate each, all different
prompts and seeds -- three ways:
  concurrent  k client threads in a closed loop (each submits its next job when its last one is done; the clients
              start 20 ms apart), all served by the engine driven on the main thread, as `muse serve` does: jobs
              arrive at different times and join the steps in flight
  sequential  the same jobs one `pipe(...)` / `pipe.inpaint(...)` call after another
  batched     the same work as two batched calls: every generation in one `pipe(prompts)`, every edit in one
              `pipe.inpaint(prompts, image=[...], mask=[...])`
and reports images/s, per-job latency p50 / p95 (concurrent: submit to result; the others: their call's), and the
engine's rows per forward. Targets, at 16 concurrent jobs: >= 90% of the batched calls' images/s, and so about 1.5x
the sequential throughput on a 2-core CPU (one image already keeps both cores busy in matmuls).

    python bench/engine.py                        # full run (~5 min on 2 cores); writes bench/results/engine-<time>.json
    python bench/engine.py --quick                # smoke run (k = 1 and 4, few jobs, 10 latency runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout first (bench/superres.py would shadow the superres package)

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse.engine import Engine  # noqa: E402
from muse.options import fast_bfloat16  # noqa: E402
from muse.pipeline import MusePipeline  # noqa: E402

CONCEPTS = ["red apple", "grinning face", "cat face", "fire", "rainbow", "penguin", "red heart", "sun", "rocket",
            "snowman", "pizza", "dog face", "tree", "star", "house", "car"]
STYLES = ["noto", "twemoji", "fluent"]
TARGET_OF_BATCHED = 0.9
TARGET_LEVEL = 16


def prompt(i: int) -> str:
    return f"{CONCEPTS[i % len(CONCEPTS)]}, {STYLES[(i // len(CONCEPTS)) % len(STYLES)]} style"


def hole(side: int) -> np.ndarray:
    """White (regenerate) on the centre half of each side: 25% of the pixels."""
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    return mask


def percentiles(seconds: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(seconds, 50) * 1000), "p95_ms": float(np.percentile(seconds, 95) * 1000),
            "mean_ms": float(np.mean(seconds) * 1000), "runs": len(seconds)}


def set_precision(pipe: MusePipeline, precision: str) -> None:
    pipe.config = dataclasses.replace(pipe.config, precision=precision)
    pipe.to(pipe.device)


def latency(pipe: MusePipeline, picture, runs: int) -> dict:
    """Part 1: one request at a time; generation and inpainting interleaved so machine drift hits both alike."""
    mask = hole(picture.size[0])
    times = {"generate": [], "inpaint": []}
    for i in range(3):  # warm-up
        pipe(prompt(i), seed=i, num_candidates=1)
        pipe.inpaint(prompt(i + 1), image=picture, mask=mask, seed=i)
    for i in range(runs):
        start = time.perf_counter()
        pipe(prompt(i), seed=1000 + i, num_candidates=1)
        times["generate"].append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.inpaint(prompt(i + 7), image=picture, mask=mask, seed=2000 + i)
        times["inpaint"].append(time.perf_counter() - start)
    return {name: percentiles(seconds) for name, seconds in times.items()}


class Workload:
    """The jobs of one concurrency level: job i is a generation (even i) or an inpainting edit (odd i)."""

    def __init__(self, pipe: MusePipeline, picture, clients: int, per_client: int) -> None:
        self.pipe, self.picture, self.mask = pipe, picture, hole(picture.size[0])
        self.clients, self.per_client = clients, per_client
        self.jobs = list(range(clients * per_client))

    def task(self, i: int):
        if i % 2 == 0:
            return self.pipe.task(self.pipe.request("generate", prompt(i), seed=i, num_candidates=1))
        return self.pipe.task(self.pipe.request("inpaint", prompt(i), image=self.picture, mask=self.mask, seed=i))

    def concurrent(self) -> dict:
        # As under `muse serve`: the thread that loaded the model (this one) drives the engine, the clients submit.
        engine = self.pipe.engine = Engine()
        latencies: list[float] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            while not engine.driven:  # submitted earlier, the first jobs would be ticked on this thread
                time.sleep(0.001)
            time.sleep(0.02 * c)  # arrivals spread out: later clients join steps already in flight
            for i in self.jobs[c :: self.clients]:
                start = time.perf_counter()
                engine.run(self.task(i))
                with lock:
                    latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(self.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        engine.drive(until=lambda: not any(t.is_alive() for t in threads))
        wall = time.perf_counter() - start
        return self._result(wall, latencies, engine)

    def sequential(self) -> dict:
        engine = self.pipe.engine = Engine()
        latencies = []
        start = time.perf_counter()
        for i in self.jobs:
            t0 = time.perf_counter()
            engine.run(self.task(i))
            latencies.append(time.perf_counter() - t0)
        return self._result(time.perf_counter() - start, latencies, engine)

    def batched(self) -> dict:
        engine = self.pipe.engine = Engine()
        generations = [i for i in self.jobs if i % 2 == 0]
        edits = [i for i in self.jobs if i % 2 == 1]
        latencies = []
        start = time.perf_counter()
        t0 = time.perf_counter()
        self.pipe([prompt(i) for i in generations], seed=generations, num_candidates=1)
        latencies += [time.perf_counter() - t0] * len(generations)
        if edits:
            t0 = time.perf_counter()
            self.pipe.inpaint([prompt(i) for i in edits], image=[self.picture] * len(edits),
                              mask=[self.mask] * len(edits), seed=edits)
            latencies += [time.perf_counter() - t0] * len(edits)
        return self._result(time.perf_counter() - start, latencies, engine)

    def _result(self, wall: float, latencies: list[float], engine: Engine) -> dict:
        return {"images": len(self.jobs), "seconds": wall, "images_per_s": len(self.jobs) / wall,
                "latency": percentiles(latencies), "rows_per_forward": engine.stats.rows_per_forward,
                "forwards": engine.stats.ticks}


def throughput(pipe: MusePipeline, picture, levels: list[int], per_client: int, reps: int) -> list[dict]:
    results = []
    for k in levels:
        work = Workload(pipe, picture, k, max(per_client, -(-16 // k)))
        runs = {"concurrent": [], "sequential": [], "batched": []}
        for rep in range(reps):  # the three ways interleaved, the order rotated, so drift is shared
            order = list(runs)[rep % 3:] + list(runs)[: rep % 3]
            for way in order:
                runs[way].append(getattr(work, way)())
        best = {way: max(r, key=lambda x: x["images_per_s"]) for way, r in runs.items()}
        median = {way: statistics.median(x["images_per_s"] for x in r) for way, r in runs.items()}
        entry = {"concurrency": k, "jobs": len(work.jobs), **{way: {"median_images_per_s": median[way],
                                                                   "runs": r} for way, r in runs.items()},
                 "concurrent_over_batched": median["concurrent"] / median["batched"],
                 "concurrent_over_sequential": median["concurrent"] / median["sequential"]}
        print(f"k={k:3d} ({len(work.jobs)} jobs): concurrent {median['concurrent']:.2f} images/s "
              f"(p50 {best['concurrent']['latency']['p50_ms']:.0f} ms, p95 {best['concurrent']['latency']['p95_ms']:.0f}"
              f" ms, {best['concurrent']['rows_per_forward']:.1f} rows/forward), sequential "
              f"{median['sequential']:.2f}, batched {median['batched']:.2f}: "
              f"{entry['concurrent_over_batched']:.0%} of batched, {entry['concurrent_over_sequential']:.2f}x "
              "sequential", file=sys.stderr, flush=True)
        results.append(entry)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pipeline directory (default: the bundled model)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrent jobs")
    p.add_argument("--jobs-per-client", type=int, default=4)
    p.add_argument("--reps", type=int, default=2, help="runs of each way per level (the median is reported)")
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1 4, 2 jobs per client, 10 latency runs")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.levels, args.jobs_per_client, args.latency_runs, args.reps = [1, 4], 2, 10, 1
    torch.set_num_threads(args.threads)
    pipe = MusePipeline.from_pretrained(args.model)
    shipped = pipe.config.precision
    picture = pipe("red apple, noto style", seed=0, num_candidates=1).images[0]
    precisions = ["float32"] + (["auto"] if shipped == "auto" and fast_bfloat16(pipe.device) else [])
    latencies = {}
    for precision in precisions:
        set_precision(pipe, precision)
        latencies[precision] = latency(pipe, picture, args.latency_runs)
        lat = latencies[precision]
        print(f"latency ({precision}): generate p50 {lat['generate']['p50_ms']:.0f} ms p95 "
              f"{lat['generate']['p95_ms']:.0f} ms; inpaint p50 {lat['inpaint']['p50_ms']:.0f} ms p95 "
              f"{lat['inpaint']['p95_ms']:.0f} ms", file=sys.stderr, flush=True)
    set_precision(pipe, shipped)
    levels = throughput(pipe, picture, args.levels, args.jobs_per_client, args.reps)
    at_target = next((r for r in levels if r["concurrency"] == TARGET_LEVEL), None)
    report = {
        "benchmark": "bench/engine.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads) | {"fast_bfloat16": fast_bfloat16(pipe.device)},
        "model": args.model or "the bundled model",
        "settings": vars(args) | {"out": None, "shipped_precision": shipped,
                                  "dtype": str(next(pipe.transformer.parameters()).dtype)},
        "latency": latencies,
        "throughput": levels,
        "targets": {
            "concurrent_over_batched_at_16": {"target": TARGET_OF_BATCHED,
                                              "value": None if at_target is None else at_target[
                                                  "concurrent_over_batched"]},
            "concurrent_over_sequential_at_16": {"target": 1.5, "value": None if at_target is None else at_target[
                "concurrent_over_sequential"]},
        },
    }
    write_report(report, "engine", args.out, default_run=vars(args) == vars(parse_args([])))
    return report


if __name__ == "__main__":
    main()
