"""One benchmark script run on two versions of the code, alternately, in one sitting: the only fair way to compare a
refactor on a machine whose speed drifts from minute to minute.

    python bench/before_after.py --base d178d65 --rounds 2 -- engine.py --levels 1 16 --latency-runs 20
    python bench/before_after.py --base d178d65 -- serve.py --levels 1 16 --seconds 20

`--base` is checked out into a temporary git worktree; each round runs the script there (its own version of the
script, against its own code) and then here, each writing its JSON report, and the reports of every run are
gathered into bench/results/before-after-<script>-<time>.json with the two commits named. The scripts' own
summaries go to stderr as they run; reading the figures side by side is left to the reader of the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def run_once(checkout: Path, script: str, arguments: list[str], out: Path) -> dict:
    """Run bench/<script> of `checkout` with its code first on the path; return its JSON report."""
    env = os.environ | {"PYTHONPATH": str(checkout)}
    command = [sys.executable, str(checkout / "bench" / script), *arguments, "--out", str(out)]
    print(f"before_after: {checkout.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=checkout, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. d178d65)")
    parser.add_argument("--rounds", type=int, default=2, help="base-then-head rounds")
    parser.add_argument("script", help="a script of bench/, e.g. engine.py")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="its arguments (after --)")
    args = parser.parse_args(argv)
    arguments = [a for a in args.arguments if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="before-after-"))
    base = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
    try:
        runs = []
        for round_ in range(args.rounds):
            for name, checkout in (("base", base), ("head", REPO)):
                report = run_once(checkout, args.script, arguments, work / f"{name}-{round_}.json")
                runs.append({"version": name, "round": round_, "report": report})
        result = {
            "benchmark": "bench/before_after.py",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "script": args.script, "arguments": arguments,
            "base": commit(base), "head": commit(REPO) + ("+" if subprocess.run(
                ["git", "-C", str(REPO), "diff", "--quiet", "HEAD"]).returncode else ""),
            "runs": runs,
        }
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = REPO / "bench" / "results" / f"before-after-{Path(args.script).stem}-{stamp}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"before_after: wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
