"""Start-up time of the `muse` command: `muse --help`, every `muse X --help`, and one image from a cold process.

Each command runs `--reps` times, each in a new process (the interpreter, torch and the models loaded from scratch;
the operating system's file cache is warm after the first run, as it is for a user's second command), timed from
`subprocess.run` to its exit. The targets of issue 16, on a 2-core machine: every `--help` under 1 s, and

    muse generate "red apple" --num-candidates 1 --out a.png

under 5 s. A run also records which heavy libraries that generation imports (`python -X importtime`), since importing
transformers or torch._dynamo alone costs seconds here.

    python bench/startup.py                 # full run: writes bench/results/startup-<time>.json
    python bench/startup.py --reps 1        # smoke run (stdout only)

Run it on a quiet machine: every number here is wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import machine_info, write_report  # noqa: E402  (bench/machine.py)
from muse import cli  # noqa: E402

HELP_TARGET_S = 1.0
GENERATE_TARGET_S = 5.0
GENERATE = ["generate", "red apple", "--num-candidates", "1"]
HEAVY = ("transformers", "torch._dynamo", "sympy", "einx", "vector_quantize_pytorch", "fastapi", "PIL")


def muse_command() -> list[str]:
    """The installed console script, or the module when it is not on PATH."""
    script = Path(sys.executable).with_name("muse")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "muse.cli"]


def timed(argv: list[str], reps: int, cwd: Path) -> dict:
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "runs_s": seconds}


def heavy_imports(argv: list[str], cwd: Path) -> dict:
    """Which of HEAVY the command imports, and its slowest top-level imports, from `python -X importtime`."""
    code = f"import sys; sys.argv = ['muse'] + {argv!r}; from muse import cli; cli.main()"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=cwd, capture_output=True, text=True)
    cumulative = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, total, name = line[len("import time:"):].split("|")
            if total.strip().isdigit():
                cumulative[name.rstrip()] = int(total) / 1e6  # microseconds -> s; top-level names are unindented
    top = {name.strip(): s for name, s in cumulative.items() if not name.startswith("  ")}
    return {"imports": {name: name in {n.strip() for n in cumulative} for name in HEAVY},
            "slowest_top_level_imports_s": dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of each command (default: 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/ for a full run)")
    args = parser.parse_args()
    muse = muse_command()
    helps = [[], *([name] for name in cli.COMMANDS), *(["data", name] for name in cli.DATA_COMMANDS)]
    with tempfile.TemporaryDirectory() as work:
        cwd = Path(work)
        results = {}
        for command in helps:
            name = " ".join(["muse", *command, "--help"])
            results[name] = timed(muse + command + ["--help"], args.reps, cwd)
            print(f"{name}: {results[name]['median_s']:.2f} s", file=sys.stderr)
        generate = timed(muse + GENERATE + ["--out", "a.png", "--overwrite"], args.reps, cwd)
        print(f"muse {' '.join(GENERATE)} --out a.png: {generate['median_s']:.2f} s", file=sys.stderr)
        imports = heavy_imports(GENERATE + ["--out", "b.png"], cwd)
    slowest_help = max(results.values(), key=lambda r: r["median_s"])["median_s"]
    report = {
        "benchmark": "startup",
        "machine": machine_info(os.cpu_count() or 1),
        "reps": args.reps,
        "help": results,
        "generate": {"command": "muse " + " ".join(f'"{a}"' if " " in a else a for a in GENERATE) + " --out a.png"}
                    | generate | imports,
        "targets": {
            "every_help_under_s": HELP_TARGET_S, "slowest_help_median_s": slowest_help,
            "help_met": slowest_help < HELP_TARGET_S,
            "generate_under_s": GENERATE_TARGET_S, "generate_median_s": generate["median_s"],
            "generate_met": generate["median_s"] < GENERATE_TARGET_S,
        },
    }
    write_report(report, "startup", args.out, default_run=args.reps == 5)


if __name__ == "__main__":
    main()
