"""Shared by the data benchmarks: a throw-away copy of the project, and each DVC stage run alone with its wall
time and peak RSS measured (the stage's own papermill process and the kernel it starts)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

sys.path.insert(0, str(REPO / "tests"))
from conftest import copy_project as copy_test_project  # noqa: E402  (one project copier for tests and benchmarks)
from conftest import merge  # noqa: E402, F401  (notebook_tax merges params with it)

# Runs one command and prints the peak RSS (KiB) over its process tree: getrusage(RUSAGE_CHILDREN) reports the
# largest descendant that was waited for (papermill waits for its kernel, so the kernel is counted).
_MEASURE = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""


def project_env(extra: dict | None = None) -> dict:
    "The environment `make pipeline` gives stage commands: the venv first on PATH, no analytics, a git identity."
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
                "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"})
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_project(destination: Path, params: dict) -> Path:
    "The tests' project copy (a fresh git repo of the project's files), with `params` as its params.yaml."
    project = copy_test_project(destination, params=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_stages(project: Path, env_extra: dict | None = None) -> dict:
    "`dvc repro --single-item` of each stage in order: {stage: {wall_s, peak_rss_gb}}."
    env = project_env(env_extra)
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    figures = {}
    for stage in stages:
        started = time.perf_counter()
        result = run([sys.executable, "-c", _MEASURE, str(BIN / "dvc"), "repro", "--single-item", stage], project, env)
        wall = time.perf_counter() - started
        peak_kib = int(result.stdout.strip().splitlines()[-1])
        figures[stage] = {"wall_s": round(wall, 2), "peak_rss_gb": round(peak_kib / 1024 ** 2, 3)}
        print(f"  {stage:<9} {wall:7.1f} s  {peak_kib / 1024 ** 2:6.2f} GB", flush=True)
    return figures


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": [round(value, 2) for value in os.getloadavg()]}


def write_result(path: Path, name: str, command: str, figures: dict, goals: dict, details: dict):
    payload = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(),
               "command": command, "figures": figures, "goals": goals, "details": details}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
