"""How long the test tiers take: `make test` (the fast tier, for every commit; goal: at most 5 minutes) and, with
`--all`, `make test-all` (everything, what CI runs; goal: at most 30 minutes, well inside CI's 90).

Each runs on a fresh clone of this repository's HEAD (under the repository's parent folder, so that `../shared`
resolves as in CI), with the environment built once beforehand from the lock file and not counted: the tiers are
timed as a data scientist runs them, commit after commit, not the first install. `CI=true` is set as CI sets it.

Usage: python benchmarks/test_times.py [--all]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.stage_runs import REPO, write_result  # noqa: E402


def make(target: str, clone: Path) -> float:
    "Run `make <target>` in the clone, its output shown as it comes; its wall time in seconds (exit on a failure)."
    started = time.monotonic()
    code = subprocess.call(["make", target], cwd=clone, env={**os.environ, "CI": "true"})
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"make {target} failed (exit {code}) after {seconds:.0f} s: nothing recorded")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also time `make test-all` (tens of minutes)")
    arguments = parser.parse_args()
    clone = REPO.parent / f"{REPO.name}-test-times"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    try:
        install_s = make(".venv/.installed", clone) if (clone / "Makefile").exists() else 0.0
        figures = {"install_s": round(install_s, 1), "make_test_s": round(make("test", clone), 1)}
        goals = {"make_test_s": {"max": 300}}
        if arguments.all:
            figures["make_test_all_s"] = round(make("test-all", clone), 1)
            goals["make_test_all_s"] = {"max": 1800}
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    write_result(REPO / "benchmarks/results/test_times.json", "test_times",
                 "python benchmarks/test_times.py" + (" --all" if arguments.all else ""), figures, goals,
                 {"commit": commit, "environment": "built from requirements.lock before the timing (install_s)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
