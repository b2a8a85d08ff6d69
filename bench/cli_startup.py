"""`sieve --help` wall time: this checkout against an earlier revision, run alternately in one process.

    python bench/cli_startup.py --against 31cc1a0 --repeats 7

Each run is a fresh interpreter importing the CLI from one tree (the tree's folder first on
sys.path) and printing the help; what it loaded of torch / transformers / matplotlib is
reported too. The earlier revision is checked out into a temporary git worktree.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("import sys; sys.argv = ['sieve', '--help']\n"
        "try:\n    from sieve_cli.cli import main; main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules), file=sys.stderr)")


def run_once(tree: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CODE], cwd=tree, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    loaded = next(line for line in done.stderr.splitlines() if line.startswith("LOADED"))
    return seconds, loaded.removeprefix("LOADED ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="31cc1a0", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=REPO, check=True,
                       capture_output=True)
        try:
            times = {"before": [], "now": []}
            loaded = {}
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                for label, tree in (("before", old), ("now", REPO)):
                    seconds, what = run_once(tree)
                    times[label].append(seconds)
                    loaded[label] = what
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=True)
    for label in ("before", "now"):
        print(f"{label:>6} ({args.against if label == 'before' else 'this checkout'}): median "
              f"{statistics.median(times[label]):.2f} s over {args.repeats} runs; loaded {loaded[label]}")
    print(f"ratio now / before: {statistics.median(times['now']) / statistics.median(times['before']):.2f}")


if __name__ == "__main__":
    main()
