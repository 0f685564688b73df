"""Load test of `muse serve` against the serial server it replaced, on loopback, side by side in one run.

Both servers run the bundled model in their own process (`muse serve` with its default settings; the old
`http.server` + global lock from bench/serial_server.py). For each number of concurrent clients (1 4 16 64) each
server gets the same closed-loop load for `--seconds`: every client keeps one keep-alive connection and sends its
next request as soon as its last one is answered, alternately a generation and an inpainting edit of a 25% hole,
one candidate each, all with different prompts and seeds. The levels alternate between the two servers so that
machine drift is shared. Reported per level and server: throughput (answered requests/s), p50 / p95 / p99 latency
of the answered ones, 429 rejections, other HTTP errors, connection errors (resets, refused, timeouts), peak RSS of
the server process, and for `muse serve` rows per forward (from /metrics). `--soak S` then runs `muse serve` alone
at 16 clients for S seconds, sampling its RSS.

Targets: >= 3x the serial server's throughput at 16 clients; no 5xx and no connection errors at 64 clients (429s
instead of unbounded waits); RSS bounded under a 10-minute soak (`--soak 600`).

Traffic goes to 127.0.0.1 only; every loop is bounded in requests and time and stops by itself.

    python bench/serve.py                          # full run (~6 min); writes bench/results/serve-<time>.json
    python bench/serve.py --seconds 5 --levels 1 4 # smoke run
    python bench/serve.py --soak 600               # + the 10-minute soak
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)

HOST = "127.0.0.1"
CONCEPTS = ["red apple", "grinning face", "cat face", "fire", "rainbow", "penguin", "red heart", "sun", "rocket",
            "snowman", "pizza", "dog face", "tree", "star", "house", "car"]
TARGET_RATIO = 3.0
SERIAL_SCRIPT = """
import sys, logging
sys.path.insert(0, {bench!r}); sys.path.insert(0, {repo!r})
logging.basicConfig(level=logging.WARNING)
import torch
torch.set_num_threads({threads})
from serial_server import make_server
from muse.pipeline import MusePipeline
server = make_server(MusePipeline.from_pretrained(), HOST, {port}, model_name="bundled")
print("ready", flush=True)
server.serve_forever()
""".replace("HOST", repr(HOST))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict) -> None:
        self.name, self.port = name, port
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip())

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: " + "\n".join(self.log[-20:]))
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def picture_png() -> tuple[str, str]:
    """A 64 px image and the mask of its centre quarter, base64 PNG."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), "white")
    for y in range(16, 48):
        for x in range(16, 48):
            image.putpixel((x, y), (220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def b64(im) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    return b64(image), b64(mask)


def request_body(i: int, image: str, mask: str) -> tuple[str, bytes]:
    prompt = f"{CONCEPTS[i % len(CONCEPTS)]}, noto style"
    if i % 2 == 0:
        return "/generate", json.dumps({"prompt": prompt, "seed": i, "num_candidates": 1}).encode()
    return "/inpaint", json.dumps({"prompt": prompt, "seed": i, "image": image, "mask": mask}).encode()


def load(server: Server, clients: int, seconds: float, image: str, mask: str, start_index: int) -> dict:
    """`clients` closed-loop clients for `seconds`; each stops at the deadline (in-flight requests finish)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(start_index, start_index + 10**7))

    def client() -> None:
        conn = None
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
            path, body = request_body(i, image, mask)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, server.port, timeout=300)
                start = time.perf_counter()
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    if response.status == 200:
                        latencies.append(elapsed)
                if response.status == 429:
                    time.sleep(float(response.getheader("Retry-After", "1")))
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    rss = []
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(rss_mb(server.process.pid)[0])
        time.sleep(0.5)
    wall = time.perf_counter() - start
    answered = statuses.get(200, 0)
    pct = (lambda q: float(np.percentile(latencies, q) * 1000)) if latencies else (lambda q: None)
    return {
        "server": server.name, "clients": clients, "seconds": wall, "answered": answered,
        "throughput": answered / wall, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "statuses": {str(k): v for k, v in sorted(statuses.items())}, "rejections_429": statuses.get(429, 0),
        "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "connection_errors": errors, "rss_peak_mb": max(rss) if rss else None,
    }


def engine_counters(server: Server) -> tuple[float, float]:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    value = lambda name: float(re.search(rf"^{name} ([0-9.e+]+)$", text, re.M).group(1))
    return value("muse_engine_forwards_total"), value("muse_engine_rows_total")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=30.0, help="load per level and server")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of a 16-client soak of muse serve (0: none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--skip-serial", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    port = free_port()
    ours = Server("muse serve", [sys.executable, "-m", "muse.cli", "serve", "--port", str(port)], port, env)
    servers = [ours]
    if not args.skip_serial:
        port = free_port()
        script = SERIAL_SCRIPT.format(bench=str(REPO / "bench"), repo=str(REPO), port=port, threads=args.threads)
        servers.append(Server("serial", [sys.executable, "-c", script], port, env))
    image, mask = picture_png()
    results = []
    try:
        for server in servers:
            server.wait_ready()
            load(server, 2, 3.0, image, mask, 0)  # warm-up
        index = 10**6
        for clients in args.levels:
            for server in servers:
                before = engine_counters(server) if server is ours else None
                result = load(server, clients, args.seconds, image, mask, index)
                index += 10**5
                if before is not None:
                    after = engine_counters(server)
                    result["rows_per_forward"] = (after[1] - before[1]) / max(1.0, after[0] - before[0])
                results.append(result)
                print(f"{server.name:>10} x{clients:<3} {result['throughput']:.2f} req/s, p50 {result['p50_ms'] or 0:.0f} "
                      f"p95 {result['p95_ms'] or 0:.0f} p99 {result['p99_ms'] or 0:.0f} ms, 429: "
                      f"{result['rejections_429']}, 5xx: {result['server_errors_5xx']}, conn errors: "
                      f"{result['connection_errors']}, RSS {result['rss_peak_mb']:.0f} MiB"
                      + (f", {result['rows_per_forward']:.1f} rows/forward" if "rows_per_forward" in result else ""),
                      file=sys.stderr, flush=True)
        soak = None
        if args.soak > 0:
            samples = []
            start = time.monotonic()
            done = {}
            thread = threading.Thread(target=lambda: done.update(load(ours, 16, args.soak, image, mask, 9 * 10**6)))
            thread.start()
            while thread.is_alive():
                samples.append((time.monotonic() - start, rss_mb(ours.process.pid)[0]))
                time.sleep(5)
            thread.join()
            soak = {"seconds": args.soak, "clients": 16, "result": done, "rss_mb": samples,
                    "rss_first_minute_max": max(r for t, r in samples if t <= 60),
                    "rss_last_minute_max": max(r for t, r in samples if t >= samples[-1][0] - 60)}
            print(f"soak {args.soak:.0f} s: RSS {soak['rss_first_minute_max']:.0f} MiB in the first minute, "
                  f"{soak['rss_last_minute_max']:.0f} MiB in the last", file=sys.stderr)
        peaks = {s.name: rss_mb(s.process.pid)[1] for s in servers}
    finally:
        for server in servers:
            server.stop()
    by = {(r["server"], r["clients"]): r for r in results}
    ratio = None
    if ("serial", 16) in by and ("muse serve", 16) in by:
        ratio = by[("muse serve", 16)]["throughput"] / by[("serial", 16)]["throughput"]
    at64 = by.get(("muse serve", 64))
    report = {
        "benchmark": "bench/serve.py",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "settings": vars(args) | {"out": None},
        "results": results,
        "soak": soak,
        "server_peak_rss_mb": peaks,
        "targets": {
            "throughput_over_serial_at_16": {"target": TARGET_RATIO, "value": ratio},
            "no_5xx_and_no_connection_errors_at_64": None if at64 is None else (
                at64["server_errors_5xx"] == 0 and not at64["connection_errors"]),
        },
    }
    write_report(report, "serve", args.out, default_run=vars(args) == vars(parse_args([])))
    return report


if __name__ == "__main__":
    main()
