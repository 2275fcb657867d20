"""Shared helpers: a throw-away copy of the project, small params, and running its commands."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import settings as hypothesis_settings

# The fuzz tests replay the same cases on every run (`make test-all`, CI): a fresh clone cannot fail on a case nobody
# has seen. `make fuzz` searches for new ones; a case it finds becomes an explicit @example.
hypothesis_settings.register_profile("repeatable", derandomize=True, max_examples=250, database=None)
hypothesis_settings.register_profile("search", derandomize=False, max_examples=3000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# params.small.yaml: the overrides of params.yaml that keep a full `dvc repro` to seconds.
# The tests' project copies: params.small.yaml's sizes, and one year of claims from 2023-01 (three test months), so
# that a batch from 2024-01 on is a month the pipeline has not seen.
SMALL_PARAMS = yaml.safe_load((REPO / "params.small.yaml").read_text())
SMALL_PARAMS = {**SMALL_PARAMS, "ingest": {**SMALL_PARAMS.get("ingest", {}), "n_months": 12, "start_month": "2023-01"},
                "features": {**SMALL_PARAMS.get("features", {}), "test_months": 3}}


def project_env() -> dict:
    "The environment stage commands run in: the project's venv first on PATH, a git identity, no analytics."
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    return env


def run(args: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run a command in `cwd` (with extra `env`); on an unexpected failure show its output."
    result = subprocess.run(args, cwd=cwd, env={**project_env(), **(env or {})}, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def copy_project(destination: Path, params: dict | None = SMALL_PARAMS) -> Path:
    "Copy the project's source files (tracked or not ignored) into `destination`, as a fresh git repo."
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / "dvc.lock").unlink(missing_ok=True)
    # The stage commands run the project's interpreter, "$DVC_ROOT"/.venv/bin/python: the copy shares this one.
    (destination / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    if params is not None:
        write_params(destination, merge(yaml.safe_load((REPO / "params.yaml").read_text()), params))
    run(["git", "init", "-q"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-qm", "copy of the project"], destination)
    return destination


def write_params(project: Path, params: dict):
    "params.yaml in the layout `dvc exp run -S` writes (what `mlops-notebooks stages check` asks for)."
    from mlops_notebooks.tools.pipeline import dvc_layout
    (project / "params.yaml").write_text(dvc_layout(yaml.safe_dump(params, sort_keys=False)))


def dvc(project: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], project, check=check, env=env)


def set_params(project: Path, override: dict):
    "Change some params of a project copy."
    write_params(project, merge(yaml.safe_load((project / "params.yaml").read_text()), override))


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory) -> Path:
    "One project copy on which `dvc repro` has run with the small params (shared: it takes a while)."
    project = copy_project(tmp_path_factory.mktemp("project"))
    dvc(project, "repro")
    return project
