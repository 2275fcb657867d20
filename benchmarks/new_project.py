"""A new project's first pipeline: wall time from `mlops-notebooks new` (copier, with the platform wheel built from
this working tree) to the end of the generated project's first `make pipeline`, its venv built from its lock
included, beside the same for a fresh `git clone` of this repository (its own `make pipeline`, its venv included).
Both learn from the synthetic claims with the same params.yaml; uv's package cache is warm for both (the repeats
take turns to go first). Issue #24's goal: the new project within 1.5x of the clone.

Usage: python benchmarks/new_project.py --repeats 2
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.stage_runs import BIN, REPO, project_env, run, write_result  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "new_project.json"
GOALS = {"ratio": {"max": 1.5}}


def new_project(folder: Path) -> dict:
    "Seconds to make the project and to its first finished `make pipeline`."
    env = project_env()
    started = time.perf_counter()
    run([str(BIN / "mlops-notebooks"), "new", str(folder / "bench-claims"), "--package", "bench_claims"], REPO, env)
    made = time.perf_counter()
    run(["make", "pipeline"], folder / "bench-claims", env)
    return {"generate_s": made - started, "total_s": time.perf_counter() - started}


def clone(folder: Path) -> dict:
    "Seconds to clone this repository and to its first finished `make pipeline`."
    env = project_env()
    started = time.perf_counter()
    run(["git", "clone", "--quiet", str(REPO), str(folder / "clone")], folder, env)
    made = time.perf_counter()
    run(["make", "pipeline"], folder / "clone", env)
    return {"generate_s": made - started, "total_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    runs = {"new_project": [], "clone": []}
    for repeat in range(args.repeats):
        order = [("new_project", new_project), ("clone", clone)]
        for name, measure in order if repeat % 2 == 0 else order[::-1]:
            folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
            try:
                runs[name].append(measure(folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"  {name:<12} {runs[name][-1]['total_s']:7.1f} s", flush=True)
    new = statistics.median(entry["total_s"] for entry in runs["new_project"])
    cloned = statistics.median(entry["total_s"] for entry in runs["clone"])
    figures = {"new_project_to_first_pipeline_s": round(new, 1), "clone_to_first_pipeline_s": round(cloned, 1),
               "ratio": round(new / cloned, 3),
               "new_project_generate_s": round(statistics.median(e["generate_s"] for e in runs["new_project"]), 1)}
    details = {name: [{key: round(value, 1) for key, value in entry.items()} for entry in entries]
               for name, entries in runs.items()}
    write_result(RESULT, "new_project", f"python benchmarks/new_project.py --repeats {args.repeats}", figures, GOALS,
                 details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
