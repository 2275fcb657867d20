"""The notebook tax: what running each DVC stage as a papermill notebook costs over a plain script.

Everything runs in throw-away copies of the project under a temporary folder, never in the repo:

1. a cold `dvc repro` of the real pipeline (papermill stages, the repo's params.yaml);
2. a cold `dvc repro` of the same pipeline with every stage turned into `stage_scripts/<stem>.py`:
   the injected params, then the notebook's `#| export` and `#| pipeline` cells in order
   (no parameters cell, no test/example cells); its data outputs must hash the same as in 1.;
   and, for comparison, 1. with every stage on `papermill --engine stage-kernel` (the cells in a kernel
   started for the stage, as papermill's own engine does, instead of in papermill's process);
3. `dvc repro` again with nothing changed (the no-op cost), each right after a no-op of a one-stage
   DVC project (DVC's floor at that moment);
4. `log_training_run` against the warm SQLite tracking store the repro created;
5. a breakdown of the per-stage difference, from papermill's own timings in the executed
   reports and from one instrumented run of the scripts (per-cell times);
6. every stage once more in each variant's copy (`dvc repro --single-item --force`), the variants back to
   back, so that what a stage adds over its script is measured on the same machine speed.

The variants take turns going first in every repeat, so a busy machine slows both alike;
figures are medians over repeats. By default Python's bytecode cache is a private, pre-warmed folder
(see `project_env`); `--bytecode-cache off` uses only what the venv holds.
Usage: python benchmarks/notebook_tax.py --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]   # benchmarks/ sits at the project root
BIN = Path(sys.executable).parent             # the project's venv: dvc, papermill, python
RESULT = REPO / "benchmarks" / "results" / "notebook_tax.json"
SCRIPTS_DIR = "stage_scripts"
TIMED_DIR = "stage_scripts_timed"             # instrumented copies, only for the breakdown
CELL_TIMES_ENV = "NOTEBOOK_TAX_CELL_TIMES"
NOOP_REPEATS = 5                              # no-op repros per copy (median of each copy, then across copies)

# The targets the issue set; repeated in the result file so anyone sees at a glance what holds.
GOALS = {
    "ratio": {"max": 1.25},
    "added_per_stage_s": {"max": 0.7},
    "ratio_paired": {"max": 1.25},               # the same two goals, from stages run back to back
    "added_per_stage_paired_s": {"max": 0.7},
    "noop_repro_s": {"max": 1.0},
    "mlflow_overhead_per_run_s": {"max": 1.5},
}


# ---------------------------------------------------------------- running commands

def project_env(scripts: bool = False, pycache: Path | None = None) -> dict:
    "The environment `make pipeline` gives stage commands: venv first on PATH, no analytics, a git identity."
    # Drop MLOPS_/MLFLOW_ overrides so each copy's settings.ini (tracking DB inside the copy) applies.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
    telemetry = os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")   # the Makefile's `?= true`
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "notebook-tax", "GIT_AUTHOR_EMAIL": "notebook-tax@example.com",
        "GIT_COMMITTER_NAME": "notebook-tax", "GIT_COMMITTER_EMAIL": "notebook-tax@example.com",
        # the same quieting exports as the Makefile, so we time what `make pipeline` runs
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": telemetry,
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    # Python's bytecode cache. These machines set PYTHONDONTWRITEBYTECODE=1; in a venv installed without
    # .pyc files (before `--compile-bytecode` in the Makefile) every process then compiles every module
    # it imports from source again: +1 s per kernel start, +3.5 s per `import mlflow`. With `pycache`,
    # bytecode goes to (and is read from) that private, pre-warmed folder, never the venv, so the
    # figures do not depend on how the venv was installed. Without it: whatever the venv holds, nothing written.
    env.pop("PYTHONPYCACHEPREFIX", None)
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.pop("MPLBACKEND", None)
    if scripts:
        # A script has no inline backend; Agg never opens a window and renders only on savefig.
        env["MPLBACKEND"] = "Agg"
    return env


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run a command; on failure raise with its output so the cause is visible."
    result = subprocess.run(args, cwd=cwd, env=env or project_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd} ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def wall_time(args: list[str], cwd: Path, env: dict | None = None) -> float:
    "Wall seconds of one command run to completion."
    started = time.perf_counter()
    run(args, cwd, env)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


# ---------------------------------------------------------------- project copies

def snapshot_project(destination: Path) -> Path:
    "Copy the project's source files (tracked, or untracked but not ignored) once, without dvc.lock."
    # One snapshot for every repeat: someone may be editing the repo while we measure.
    listed = run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                 REPO).stdout.split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():   # a deleted-but-tracked file is listed too
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / "dvc.lock").unlink(missing_ok=True)   # cold: DVC must run every stage
    (destination / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)  # the stage commands' interpreter
    return destination


def commit_copy(project: Path):
    "Make the copy its own git repo: DVC and the lineage tags (git commit, dirty) need one."
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "notebook_tax copy"], project)


def out_path(entry) -> str:
    "A dvc.yaml outs/metrics/plots entry is a path or `{path: options}`."
    return next(iter(entry)) if isinstance(entry, dict) else entry


def papermill_paths(cmd: str) -> tuple[str, str, str]:
    "Input notebook, output report and parameters file of a `... -m papermill IN OUT -f PARAMS` command."
    tokens = shlex.split(cmd)
    if "papermill" not in tokens:
        raise ValueError(f"not a papermill stage: {cmd}")
    if any(token in ("-p", "--parameters", "-r", "--parameters_raw", "-y", "--parameters_yaml") for token in tokens):
        raise ValueError(f"only `-f params.yaml` is reproduced by the script prelude: {cmd}")
    notebooks = [token for token in tokens if token.endswith(".ipynb")]
    flag = next(index for index, token in enumerate(tokens) if token in ("-f", "--parameters_file"))
    return notebooks[0], notebooks[1], tokens[flag + 1]


def stage_order(project: Path) -> list[str]:
    "Stage names in dvc.yaml order (a chain here, so also the order DVC runs them)."
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


# ---------------------------------------------------------------- notebook -> script

DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)")
FUTURE = re.compile(r"^from __future__ import .+$", re.MULTILINE)


def cell_directives(source: str) -> list[str]:
    "The nbdev `#| name` directives of a cell."
    return [match.group(1) for match in map(DIRECTIVE.match, source.splitlines()) if match]


def cell_kind(cell: dict) -> str:
    "parameters / injected / export / pipeline / test (plain code) / directive-only / markdown."
    if cell["cell_type"] != "code":
        return "markdown"
    tags = cell.get("metadata", {}).get("tags", [])
    if "injected-parameters" in tags:
        return "injected"
    if "parameters" in tags:
        return "parameters"
    source = "".join(cell["source"])
    directives = cell_directives(source)
    if any(name.startswith("export") for name in directives):   # export, exporti, exports
        return "export"
    if "pipeline" in directives:
        return "pipeline"
    code = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "test" if code else "directive-only"   # e.g. `#| default_exp ingest`


def stage_cells(notebook: Path) -> list[dict]:
    "The cells a script keeps: exported functions and stage cells, in notebook order."
    cells = json.loads(notebook.read_text())["cells"]
    return [cell for cell in cells if cell_kind(cell) in ("export", "pipeline")]


def strip_ipython(source: str) -> tuple[str, int]:
    "Drop line magics and shell escapes (`%...`, `!...`); count them (the stage cells should have none)."
    kept, dropped = [], 0
    for line in source.splitlines():
        if line.startswith(("%", "!")):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def needs_display_shim(bodies: list[str]) -> bool:
    "Do the cells call IPython's built-in `display()` without importing or defining their own?"
    code = "\n".join(bodies)
    calls = re.search(r"(?<![\w.])display\(", code)
    own = re.search(r"^\s*(def display\b|display\s*=|from IPython(\.\w+)* import .*\bdisplay\b)", code, re.MULTILINE)
    return bool(calls) and not own


def script_source(notebook: Path, params_file: str, sections: list[str], timed: bool = False) -> tuple[str, int]:
    """A plain script equivalent to running `notebook` under papermill (optionally timing each cell), and how
    many IPython-only bits it had to drop or shim."""
    bodies, dropped, future = [], 0, set()
    for cell in stage_cells(notebook):
        body, stripped = strip_ipython("".join(cell["source"]))
        dropped += stripped
        # A kernel compiles cell by cell, so `from __future__` may open any cell; a script allows it
        # only at the top. IPython keeps the flag for later cells, so hoisting changes nothing.
        future.update(FUTURE.findall(body))
        bodies.append((cell.get("id", "?"), cell_kind(cell), FUTURE.sub("", body).strip("\n")))

    lines = [f"# Generated by benchmarks/notebook_tax.py from {notebook.parent.name}/{notebook.name}: "
             "the stage as a plain script.", *sorted(future)]
    if needs_display_shim([body for _, _, body in bodies]):
        shims = 1
        lines += ["",
                  "# IPython's built-in `display()` only adds output to the executed report; a script has none.",
                  "def display(*objects, **kwargs):",
                  "    pass",
                  ""]
    else:
        shims = 0
    if timed:
        lines += ["import time as _tax_time", "_tax_marks = [('start', 'start', _tax_time.perf_counter())]"]
    lines += [
        "import os as _os",
        "import sys as _sys",
        "import yaml as _yaml",
        "",
        "# papermill's kernel has the working directory (the project root) on sys.path; a script gets its own",
        "# folder instead, so put the root first: `mlops_notebooks` then comes from this copy, not the editable install.",
        "_sys.path.insert(0, _os.getcwd())",
        "",
        "class _NoDatesSafeLoader(_yaml.SafeLoader):",
        "    \"papermill's YAML loader: safe, and dates stay strings.\"",
        "_NoDatesSafeLoader.yaml_implicit_resolvers = {",
        "    first: [resolver for resolver in resolvers if resolver[0] != 'tag:yaml.org,2002:timestamp']",
        "    for first, resolvers in _yaml.SafeLoader.yaml_implicit_resolvers.items()}",
        "",
        f"# What `papermill -f {params_file}` injects: one variable per top-level section.",
        f"with open({params_file!r}) as _handle:",
        "    _params = _yaml.load(_handle, Loader=_NoDatesSafeLoader)",
        *[f"{section} = _params[{section!r}]" for section in sections],
    ]
    if timed:
        lines.append("_tax_marks.append(('prelude', 'prelude', _tax_time.perf_counter()))")
    for cell_id, kind, body in bodies:
        lines += ["", f"# %% cell {cell_id} ({kind})", body]
        if timed:
            lines.append(f"_tax_marks.append(({cell_id!r}, {kind!r}, _tax_time.perf_counter()))")
    if timed:
        lines += ["", "import json as _tax_json",
                  f"with open(_os.environ[{CELL_TIMES_ENV!r}], 'w') as _tax_out:",
                  "    _tax_json.dump(_tax_marks, _tax_out)"]
    return "\n".join(lines) + "\n", dropped + shims


def convert_to_scripts(project: Path) -> tuple[dict, int]:
    """Turn every papermill stage of the copy into `python stage_scripts/<stem>.py`; return each stage's
    sources and the number of IPython-only bits dropped or shimmed."""
    dvc_file = project / "dvc.yaml"
    pipeline = yaml.safe_load(dvc_file.read_text())
    notebooks, adjustments = {}, 0
    for name, stage in pipeline["stages"].items():
        notebook, report, params_file = papermill_paths(stage["cmd"])
        sections = list(yaml.safe_load((project / params_file).read_text()))
        script = f"{SCRIPTS_DIR}/{Path(notebook).stem}.py"
        notebooks[name] = {"notebook": notebook, "params_file": params_file}
        source, adjusted = script_source(project / notebook, params_file, sections)
        adjustments += adjusted
        (project / script).parent.mkdir(exist_ok=True)
        (project / script).write_text(source)
        # Same params, other deps, outs, metrics and plots; the script replaces the notebook as a dep,
        # and there is no executed report to keep.
        stage["cmd"] = f"python {script}"
        stage["deps"] = [script if dep == notebook else dep for dep in stage["deps"]]
        stage["outs"] = [entry for entry in stage.get("outs", []) if out_path(entry) != report]
        if not stage["outs"]:
            del stage["outs"]   # a stage whose only out was its report (evaluate)
    dvc_file.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return notebooks, adjustments


def prepare_copy(snapshot: Path, destination: Path, variant: str) -> dict:
    "A fresh, committed copy of the snapshot: as notebooks (unchanged), notebooks in kernels, or scripts."
    shutil.copytree(snapshot, destination, symlinks=True)
    info = {}
    if variant == "kernel":
        dvc_file = destination / "dvc.yaml"
        text = dvc_file.read_text()
        if "--engine stage " not in text:
            raise RuntimeError(f"no `--engine stage` stage command in {dvc_file}")
        dvc_file.write_text(text.replace("--engine stage ", "--engine stage-kernel "))
    if variant == "scripts":
        info["notebooks"], info["ipython_adjustments"] = convert_to_scripts(destination)
    commit_copy(destination)   # after the conversion, so the scripts are committed like notebooks
    return info


# ---------------------------------------------------------------- dvc repro, timed

RUNNING = re.compile(r"Running stage '([^']+)'")


def children_cpu_s() -> float:
    "User + system CPU seconds of every finished child process so far (DVC, papermill, kernels, scripts)."
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_repro(project: Path, env: dict, log: Path) -> dict:
    "One whole `dvc repro`: wall and CPU time, and per-stage times from when DVC announces each stage."
    # Per-stage time = from "Running stage 'x'" to the next announcement (or the end), so it includes
    # DVC's hashing and caching of that stage's outputs; `startup_s` is DVC's time before the first stage.
    # CPU time and the load average are recorded because other work on these small machines
    # (someone's test run) inflates wall times.
    load_before = os.getloadavg()[0]
    cpu_before = children_cpu_s()
    started = time.perf_counter()
    marks = []
    with open(log, "w") as handle:
        process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            now = time.perf_counter() - started
            handle.write(f"{now:9.3f} {line}")
            match = RUNNING.search(line)
            if match:
                marks.append((match.group(1), now))
        code = process.wait()
    total = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"dvc repro failed in {project} ({code}); last lines of {log}:\n"
                           + "".join(log.read_text().splitlines(keepends=True)[-40:]))
    ends = [when for _, when in marks[1:]] + [total]
    return {"total_s": total, "cpu_s": children_cpu_s() - cpu_before,
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "startup_s": marks[0][1] if marks else total,
            "stages": {name: end - begin for (name, begin), end in zip(marks, ends, strict=False)}}


def locked_md5s(project: Path) -> dict:
    "Every output's md5 as recorded in the copy's dvc.lock."
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}


# ---------------------------------------------------------------- breakdown sources

def parse_time(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp)


def has_image(cell: dict) -> bool:
    return any("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def report_timings(report: Path) -> dict:
    "Where a papermill run's time went, from the timestamps papermill writes into the executed report."
    nb = json.loads(report.read_text())
    meta = nb["metadata"]["papermill"]
    cells = [cell for cell in nb["cells"] if cell["metadata"].get("papermill", {}).get("start_time")]
    first, last = cells[0]["metadata"]["papermill"], cells[-1]["metadata"]["papermill"]
    timings = {
        "notebook_s": meta["duration"],
        # between notebook_start and the first cell: the IPython shell is made (in process), or nbclient
        # starts the kernel and waits for it (stage-kernel)
        "engine_start_s": (parse_time(first["start_time"]) - parse_time(meta["start_time"])).total_seconds(),
        # after the last cell: nothing (in process), or a kernel_info request and the kernel's shutdown
        "engine_stop_s": (parse_time(meta["end_time"]) - parse_time(last["end_time"])).total_seconds(),
        "between_cells_s": 0.0,   # papermill saves the whole notebook after every cell (and before)
        "cells": {},
    }
    for previous, cell in zip(cells, cells[1:], strict=False):
        timings["between_cells_s"] += (parse_time(cell["metadata"]["papermill"]["start_time"])
                                       - parse_time(previous["metadata"]["papermill"]["end_time"])).total_seconds()
    kinds = {}
    for cell in cells:
        kind = cell_kind(cell)
        if kind == "pipeline" and has_image(cell):
            kind = "pipeline_plot"   # inline backend renders the figure to PNG inside the cell's time
        kinds[kind] = kinds.get(kind, 0.0) + cell["metadata"]["papermill"]["duration"]
        if cell["cell_type"] == "code":
            timings["cells"][cell.get("id", "?")] = {"kind": kind, "s": cell["metadata"]["papermill"]["duration"]}
    timings["kinds"] = kinds
    timings["code_cells"] = sum(1 for cell in cells if cell["cell_type"] == "code")
    timings["all_cells"] = len(cells)
    return timings


def save_cost(report: Path, repeats: int = 5) -> float:
    "Seconds papermill takes to save this executed notebook once (it does so twice per cell)."
    from papermill.iorw import load_notebook_node, write_ipynb
    nb = load_notebook_node(str(report))
    with tempfile.TemporaryDirectory() as scratch:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            write_ipynb(nb, str(Path(scratch) / report.name))
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_scripts_pass(project: Path, notebooks: dict, order: list[str], env: dict, logs: Path) -> dict:
    "Run each stage's instrumented script once, in order, outside DVC: per-cell and per-process seconds."
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    results = {}
    for name in order:
        stage = pipeline[name]
        notebook, params_file = project / notebooks[name]["notebook"], notebooks[name]["params_file"]
        sections = list(yaml.safe_load((project / params_file).read_text()))
        timed = project / TIMED_DIR / f"{notebook.stem}.py"
        timed.parent.mkdir(exist_ok=True)
        timed.write_text(script_source(notebook, params_file, sections, timed=True)[0])
        # DVC deletes a stage's outputs before running it; train renames its model dir onto the target.
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                path = project / out_path(entry)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        marks_file = logs / f"cells-{name}.json"
        started = time.perf_counter()
        run([sys.executable, str(timed.relative_to(project))], project, {**env, CELL_TIMES_ENV: str(marks_file)})
        process_s = time.perf_counter() - started
        marks = json.loads(marks_file.read_text())
        cells = {cell_id: {"kind": kind, "s": end - begin}
                 for (_, _, begin), (cell_id, kind, end) in zip(marks, marks[1:], strict=False)}
        results[name] = {"process_s": process_s, "in_script_s": marks[-1][2] - marks[0][2], "cells": cells}
    return results


def tool_timings(repeats: int, cwd: Path, env: dict) -> dict:
    "Fixed costs, each in fresh processes: interpreter start, imports, the papermill CLI."
    python = sys.executable
    def in_process(statement: str) -> float:
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        return float(run([python, "-c", code], cwd, env).stdout.strip().splitlines()[-1])
    return {
        "python_start_s": median([wall_time([python, "-c", "pass"], cwd, env) for _ in range(repeats)]),
        "papermill_import_s": median([in_process("import papermill") for _ in range(repeats)]),
        "papermill_cli_help_s": median([wall_time([str(BIN / "papermill"), "--help"], cwd, env) for _ in range(repeats)]),
        "mlflow_import_s": median([in_process("import mlflow, mlflow.sklearn") for _ in range(repeats)]),
        # DVC's own start-up, the floor under every `dvc repro` including a no-op one
        "dvc_version_s": median([wall_time([str(BIN / "dvc"), "--version"], cwd, env) for _ in range(repeats)]),
    }


# ---------------------------------------------------------------- MLflow overhead (subprocess)

def probe_mlflow(project: Path, runs: int) -> dict:
    "Inside a copy after its repro: time `log_training_run` on the default pipeline's fitted model."
    # Import the copy's package, not the editable install (which points at the repo being edited).
    sys.path.insert(0, str(project))
    os.chdir(project)
    import mlflow  # noqa: F401  (the brief: time runs after `import mlflow`)

    import mlops_notebooks
    from mlops_notebooks.core.artifacts import flatten, lineage_tags, read_parquet
    from mlops_notebooks.core.settings import configure_mlflow, load_settings, parse_params
    from mlops_notebooks.stages.schema import DataParams
    from mlops_notebooks.stages.train import TrainParams, feature_frame, fit_model, log_training_run
    assert Path(mlops_notebooks.__file__).resolve().is_relative_to(project.resolve()), mlops_notebooks.__file__

    params = yaml.safe_load((project / "params.yaml").read_text())
    declared = parse_params(DataParams, "data", params["data"])
    train = parse_params(TrainParams, "train", params["train"])
    training = read_parquet(project / "data/processed/train.parquet", made_by="features")
    model = fit_model(training, declared, train)
    inputs = feature_frame(training, declared)
    metrics = {"train_rows": float(len(training)), "fit_seconds": 1.0,
               "train_mean_target": float(training[declared.model_target].mean())}
    stage_params = {"data": declared.model_dump(), "train": train.model_dump()}
    tags = lineage_tags(project, inputs=["data/processed/train.parquet"], params=stage_params,
                        reports=["reports/05_train.ipynb"])
    settings = load_settings(project)
    assert settings.tracking_uri.startswith("sqlite:///") and (project / "mlflow.db").exists(), settings
    configure_mlflow(settings, project)   # the store exists and is migrated: the repro made it

    def one_run(model_dir: Path | None) -> float:
        started = time.perf_counter()
        log_training_run(model, inputs, metrics, flatten(stage_params), tags, model_dir=model_dir)
        return time.perf_counter() - started

    # The first call also imports mlflow.sklearn and the signature machinery; report it apart.
    first = one_run(None)
    logged = [one_run(None) for _ in range(runs)]
    # What the train stage actually calls: log, and save the model again as the DVC output.
    with tempfile.TemporaryDirectory(dir=project) as scratch:
        saved = [one_run(Path(scratch) / f"model-{index}") for index in range(runs)]
    return {"mlflow_first_run_s": round(first, 3), "mlflow_overhead_per_run_s": median(logged),
            "mlflow_log_and_save_per_run_s": median(saved), "mlflow_runs": runs}


# ---------------------------------------------------------------- the benchmark

# The small params the end-to-end tests use: the warm-up repro is quick and every stage runs its real code path.
WARMUP_PARAMS = yaml.safe_load((REPO / "params.small.yaml").read_text())


def merge(base: dict, override: dict) -> dict:
    "`base` with `override`'s values put in, nested sections merged key by key."
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def warm_bytecode_cache(snapshot: Path, workdir: Path, pycache: Path):
    "Fill the private bytecode cache as a first run would: one small, untimed notebooks repro."
    # The notebooks pipeline imports a superset of what the scripts import (papermill, ipykernel).
    project = workdir / "warmup"
    shutil.copytree(snapshot, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge(params, WARMUP_PARAMS), sort_keys=False))
    commit_copy(project)
    timed_repro(project, project_env(pycache=pycache), workdir / "warmup.log")
    shutil.rmtree(project)


def make_floor_project(workdir: Path, env: dict) -> Path:
    "DVC's floor: a git + DVC project with one stage (one file in, one out), run once so a repro is a no-op."
    floor = workdir / "floor"
    floor.mkdir()
    run(["git", "init", "-q"], floor, env)
    run([str(BIN / "dvc"), "init", "-q"], floor, env)
    run([str(BIN / "dvc"), "config", "core.analytics", "false"], floor, env)
    (floor / "input.txt").write_text("claims\n")
    (floor / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp input.txt output.txt\n"
                                    "    deps:\n      - input.txt\n    outs:\n      - output.txt\n")
    timed_repro(floor, env, workdir / "floor-first.log")
    return floor


def timed_stage(project: Path, env: dict, stage: str, log: Path) -> float:
    "Wall seconds of `dvc repro --single-item --force <stage>` in a repro'd copy (DVC's start-up included)."
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "dvc"), "repro", "--single-item", "--force", stage], cwd=project, env=env,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"dvc repro --single-item --force {stage} failed in {project} ({result.returncode}); "
                           f"last lines of {log}:\n" + "".join(log.read_text().splitlines(keepends=True)[-40:]))
    return seconds


def paired_stage_runs(copies: dict, stages: list[str], pycache: Path | None, workdir: Path, repeat: int) -> dict:
    "Every stage forced once more in each variant's copy, the variants back to back: {variant: {stage: seconds}}."
    # The whole repros of the variants run ~40 s apart, long enough for this machine's speed to change by
    # more than the notebook tax: two runs of this benchmark on one afternoon gave +0.76 s and -0.49 s a
    # stage. Run back to back, a stage's variants see the same machine, and DVC's start-up, common to
    # both, cancels in their difference. Who goes first rotates with the stage.
    variants = list(copies)
    times = {variant: {} for variant in variants}
    for index, stage in enumerate(stages):
        shift = (index + repeat) % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            env = project_env(scripts=variant == "scripts", pycache=pycache)
            times[variant][stage] = timed_stage(copies[variant], env, stage,
                                                workdir / f"{variant}-{repeat}-paired-{stage}.log")
    return times


def one_variant(snapshot: Path, workdir: Path, variant: str, repeat: int, breakdown: bool,
                pycache: Path | None, floor_project: Path) -> dict:
    "Copy, cold repro, no-op repro, and the breakdown sources of one variant in one repeat."
    project = workdir / f"{variant}-{repeat}"
    info = prepare_copy(snapshot, project, variant)
    env = project_env(scripts=variant == "scripts", pycache=pycache)
    cold = timed_repro(project, env, workdir / f"{variant}-{repeat}-cold.log")
    # A no-op repro is ~1 s of which DVC's start-up is most: one sample is mostly noise, so take several.
    # Each no-op follows a no-op of DVC's floor project (see `make_floor_project`) at once: on these
    # shared machines the same no-op takes 0.7 s in one quarter of an hour and 1.2 s in the next, with its
    # CPU time moving alike (it is CPU-bound: the machine's speed changes, not the waiting), so only the
    # difference within each pair says what this project's stages cost on top of DVC itself.
    noops, noop_cpus, noop_loads, floors = [], [], [], []
    for attempt in range(NOOP_REPEATS):
        floor = timed_repro(floor_project, env, workdir / f"{variant}-{repeat}-floor-{attempt}.log")
        noop = timed_repro(project, env, workdir / f"{variant}-{repeat}-noop-{attempt}.log")
        for name, where, timing in (("no-op", project, noop), ("floor", floor_project, floor)):
            if timing["stages"]:
                raise RuntimeError(f"the {name} repro re-ran {sorted(timing['stages'])} in {where}")
        noops.append(noop["total_s"])
        noop_cpus.append(noop["cpu_s"])
        noop_loads.append(noop["load_1m"][0])
        floors.append(floor["total_s"])
    result = {"project": project, "cold": cold, "noop_s": statistics.median(noops), "noop_samples_s": noops,
              "noop_cpu_s": statistics.median(noop_cpus), "noop_cpu_samples_s": noop_cpus,
              "noop_load_1m": noop_loads, "floor_samples_s": floors,
              "md5": locked_md5s(project), **info}
    if breakdown and variant == "notebooks":
        result["reports"] = {}
        for name in cold["stages"]:
            stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][name]
            report = project / papermill_paths(stage["cmd"])[1]
            result["reports"][name] = {**report_timings(report), "save_s": save_cost(report)}
    if breakdown and variant == "scripts":
        result["script_cells"] = timed_scripts_pass(project, info["notebooks"], list(cold["stages"]), env, workdir)
    return result


def check_same_results(notebooks: dict, scripts: dict) -> dict:
    "Same functions, same results: every data output must hash the same; report other outputs too."
    shared = sorted(set(notebooks["md5"]) & set(scripts["md5"]))
    data = [path for path in shared if path.startswith("data/")]
    different = [path for path in data if notebooks["md5"][path] != scripts["md5"][path]]
    assert data and not different, f"data outputs differ between notebooks and scripts: {different}"
    # Model folders embed run ids and creation times, so only the data must match; the rest is reported.
    return {"data_outputs_identical": len(data),
            "other_outputs_differing": [path for path in shared
                                        if path not in data and notebooks["md5"][path] != scripts["md5"][path]]}


def stage_breakdown(stage: str, runs: list[dict]) -> dict:
    "Decompose the median per-stage (notebook - script) time into measured parts."
    def med(pick) -> float:
        return median([pick(run) for run in runs])
    nb_stage = med(lambda run: run["notebooks"]["cold"]["stages"][stage])
    sc_stage = med(lambda run: run["scripts"]["cold"]["stages"][stage])
    def report(run):
        return run["notebooks"]["reports"][stage]
    def cells(run):
        return run["scripts"]["script_cells"][stage]
    def script_kind(run, *kinds) -> float:
        return sum(cell["s"] for cell in cells(run)["cells"].values() if cell["kind"] in kinds)
    def notebook_kind(run, *kinds) -> float:
        return sum(report(run)["kinds"].get(kind, 0.0) for kind in kinds)
    def plot_cells_in_script(run) -> float:
        # the same cells that produced an inline PNG in the notebook, as timed in the script
        plotted = {cell_id for cell_id, cell in report(run)["cells"].items() if cell["kind"] == "pipeline_plot"}
        return sum(cell["s"] for cell_id, cell in cells(run)["cells"].items() if cell_id in plotted)

    # Per run these parts add up exactly to (notebook stage - script stage); the medians nearly do.
    # The first six come from the notebook run alone; the rest compare with the scripts' runs.
    parts = {
        # the papermill process outside its own timer: interpreter, `import papermill`, reading and
        # parameterizing the notebook, writing the report; plus DVC's bookkeeping of the stage
        "papermill_outside_notebook_s": med(lambda run: run["notebooks"]["cold"]["stages"][stage]
                                                        - report(run)["notebook_s"]),
        "engine_start_s": med(lambda run: report(run)["engine_start_s"]),
        "engine_stop_s": med(lambda run: report(run)["engine_stop_s"]),
        # gaps between cells and markdown "cells" are papermill saving the notebook, nothing else
        "notebook_saves_s": med(lambda run: report(run)["between_cells_s"] + notebook_kind(run, "markdown")),
        "parameter_cells_s": med(lambda run: notebook_kind(run, "parameters", "injected", "directive-only")),
        "test_cells_s": med(lambda run: notebook_kind(run, "test")),
        # what the script spends outside its cells (interpreter start and exit, DVC's bookkeeping)
        # and in its params prelude, subtracted
        "minus_script_outside_cells_s": med(lambda run: -(run["scripts"]["cold"]["stages"][stage]
                                                          - cells(run)["in_script_s"])),
        "minus_script_prelude_s": med(lambda run: -cells(run)["cells"]["prelude"]["s"]),
        # the same code in both: any difference is IPython (display, inline PNG rendering) or noise
        "export_cells_nb_minus_script_s": med(lambda run: notebook_kind(run, "export") - script_kind(run, "export")),
        "plot_cells_nb_minus_script_s": med(lambda run: notebook_kind(run, "pipeline_plot") - plot_cells_in_script(run)),
        "other_pipeline_cells_nb_minus_script_s": med(
            lambda run: notebook_kind(run, "pipeline") - (script_kind(run, "pipeline") - plot_cells_in_script(run))),
    }
    return {
        "notebook_stage_s": nb_stage, "script_stage_s": sc_stage, "added_s": round(nb_stage - sc_stage, 3),
        "notebook_run_s": med(lambda run: report(run)["notebook_s"]),
        "script_process_s": med(lambda run: cells(run)["process_s"]),
        "script_in_process_s": med(lambda run: cells(run)["in_script_s"]),
        "code_cells": runs[-1]["notebooks"]["reports"][stage]["code_cells"],
        "all_cells": runs[-1]["notebooks"]["reports"][stage]["all_cells"],
        "notebook_save_s": round(med(lambda run: report(run)["save_s"]), 4),
        "parts": parts,
    }


def paired_figures(paired: list[dict], stages: list[str], cold_scripts: float) -> dict:
    "What each stage adds over its script when the two run back to back (medians over repeats)."
    def added(variant: str) -> dict:
        return {stage: median([times[variant][stage] - times["scripts"][stage] for times in paired])
                for stage in stages}
    notebooks, kernel = added("notebooks"), added("kernel")
    return {
        "added_per_stage_paired_s": round(sum(notebooks.values()) / len(stages), 3),
        # the whole-pipeline ratio these differences imply, over the scripts' own cold repro
        "ratio_paired": round(1 + sum(notebooks.values()) / cold_scripts, 3),
        "added_per_stage_paired_kernel_engine_s": round(sum(kernel.values()) / len(stages), 3),
        "ratio_paired_kernel_engine": round(1 + sum(kernel.values()) / cold_scripts, 3),
        "paired_added_s": {"notebooks": notebooks, "kernel": kernel},
        "paired_stage_runs_s": [{variant: {stage: round(seconds, 3) for stage, seconds in times[variant].items()}
                                 for variant in times} for times in paired],
    }


def build_record(args, runs: list[dict], tools: dict, mlflow_figures: dict, checks: list[dict],
                 paired: list[dict]) -> dict:
    "The result file's JSON object, figures as medians over repeats."
    notebooks = [run["notebooks"] for run in runs]
    scripts = [run["scripts"] for run in runs]
    kernel = [run["kernel"] for run in runs]
    cold_kernel = median([run["cold"]["total_s"] for run in kernel])
    groups = (("notebooks", notebooks), ("scripts", scripts), ("kernel", kernel))
    stages = list(notebooks[0]["cold"]["stages"])
    cold_nb = median([run["cold"]["total_s"] for run in notebooks])
    cold_sc = median([run["cold"]["total_s"] for run in scripts])
    figures = {
        "cold_repro_notebooks_s": cold_nb,
        "cold_repro_scripts_s": cold_sc,
        "ratio": round(cold_nb / cold_sc, 3),
        "added_per_stage_s": round((cold_nb - cold_sc) / len(stages), 3),
        # Other work on the machine (tests, someone's repro) can slow one run several-fold: OpenMP in
        # the gradient boosting spins on a contended core. The least-disturbed run of each variant and
        # the ratio within each repeat show what the medians of two separate sets can hide.
        "cold_repro_notebooks_min_s": round(min(run["cold"]["total_s"] for run in notebooks), 3),
        "cold_repro_scripts_min_s": round(min(run["cold"]["total_s"] for run in scripts), 3),
        "ratio_of_mins": round(min(run["cold"]["total_s"] for run in notebooks)
                               / min(run["cold"]["total_s"] for run in scripts), 3),
        "added_per_stage_of_mins_s": round((min(run["cold"]["total_s"] for run in notebooks)
                                            - min(run["cold"]["total_s"] for run in scripts)) / len(stages), 3),
        "ratio_per_repeat": [round(nb["cold"]["total_s"] / sc["cold"]["total_s"], 3)
                             for nb, sc in zip(notebooks, scripts, strict=False)],
        **paired_figures(paired, stages, cold_sc),
        # the same notebooks, each stage in a kernel of its own (`--engine stage-kernel`), in the same repeats
        "cold_repro_kernel_engine_s": cold_kernel,
        "ratio_kernel_engine": round(cold_kernel / cold_sc, 3),
        "added_per_stage_kernel_engine_s": round((cold_kernel - cold_sc) / len(stages), 3),
        "noop_repro_s": median([run["noop_s"] for run in notebooks]),
        "noop_repro_scripts_s": median([run["noop_s"] for run in scripts]),
        "noop_repro_samples_s": [round(sample, 3) for run in notebooks for sample in run["noop_samples_s"]],
        "noop_repro_cpu_s": median([run["noop_cpu_s"] for run in notebooks]),
        "noop_repro_cpu_samples_s": [round(sample, 3) for run in notebooks for sample in run["noop_cpu_samples_s"]],
        "noop_repro_load_1m": [load for run in notebooks for load in run["noop_load_1m"]],
        # DVC's floor (a one-stage project's no-op, run just before each no-op above) and, pair by pair,
        # what this pipeline's 7 stages with complete deps add to it
        "noop_floor_s": median([sample for run in notebooks for sample in run["floor_samples_s"]]),
        "noop_floor_samples_s": [round(sample, 3) for run in notebooks for sample in run["floor_samples_s"]],
        "noop_over_floor_s": median([noop - floor for run in notebooks
                                     for noop, floor in zip(run["noop_samples_s"], run["floor_samples_s"], strict=False)]),
        "mlflow_overhead_per_run_s": mlflow_figures["mlflow_overhead_per_run_s"],
        "mlflow_import_s": tools["mlflow_import_s"],
        "mlflow_first_run_s": mlflow_figures["mlflow_first_run_s"],
        "mlflow_log_and_save_per_run_s": mlflow_figures["mlflow_log_and_save_per_run_s"],
        "cold_repro_notebooks_cpu_s": median([run["cold"]["cpu_s"] for run in notebooks]),
        "cold_repro_scripts_cpu_s": median([run["cold"]["cpu_s"] for run in scripts]),
        "stages": len(stages),
        "dvc_startup_s": {variant: median([run["cold"]["startup_s"] for run in group])
                          for variant, group in (("notebooks", notebooks), ("scripts", scripts))},
        "stage_s": {variant: {stage: median([run["cold"]["stages"][stage] for run in group]) for stage in stages}
                    for variant, group in groups},
        # every run, in the order they ran, with the 1-minute load average before and after it
        "cold_repro_runs": {variant: [{"s": round(run["cold"]["total_s"], 3), "cpu_s": round(run["cold"]["cpu_s"], 3),
                                       "load_1m": run["cold"]["load_1m"]} for run in group]
                            for variant, group in groups},
        "fixed_costs": tools,
        "same_results": checks[-1],
        "ipython_adjustments": scripts[0].get("ipython_adjustments", 0),   # magic lines dropped + display() shims
    }
    if "reports" in notebooks[0]:
        breakdown = {stage: stage_breakdown(stage, runs) for stage in stages}
        figures["breakdown_per_stage"] = breakdown
        figures["breakdown_total_s"] = {part: round(sum(breakdown[stage]["parts"][part] for stage in stages), 3)
                                        for part in breakdown[stages[0]]["parts"]}
    figures["bytecode_cache"] = args.bytecode_cache
    command = f"python benchmarks/notebook_tax.py --repeats {args.repeats}"
    if args.bytecode_cache != "warm":
        command += f" --bytecode-cache {args.bytecode_cache}"
    if args.no_breakdown:
        command += " --no-breakdown"
    return {"benchmark": "notebook_tax", "date": datetime.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "command": command, "figures": figures, "goals": GOALS}


def print_table(record: dict):
    "A short human-readable summary, goals alongside."
    figures, goals = record["figures"], record["goals"]
    print(f"\nnotebook_tax  ({record['date']}, {record['machine']['cpus']} cpus, {record['command']})")
    for name in ("cold_repro_notebooks_s", "cold_repro_scripts_s", "ratio", "added_per_stage_s",
                 "cold_repro_kernel_engine_s", "ratio_kernel_engine", "added_per_stage_kernel_engine_s",
                 "cold_repro_notebooks_min_s", "cold_repro_scripts_min_s", "ratio_of_mins", "added_per_stage_of_mins_s",
                 "ratio_paired", "added_per_stage_paired_s", "ratio_paired_kernel_engine",
                 "added_per_stage_paired_kernel_engine_s",
                 "noop_repro_s", "noop_repro_cpu_s", "noop_floor_s", "noop_over_floor_s",
                 "mlflow_overhead_per_run_s", "mlflow_import_s"):
        goal = goals.get(name)
        verdict = "" if goal is None else f"  goal <= {goal['max']}: {'ok' if figures[name] <= goal['max'] else 'MISSED'}"
        print(f"  {name:28s} {figures[name]:8.3f}{verdict}")
    print(f"  {'ratio_per_repeat':28s} {figures['ratio_per_repeat']}")
    print(f"\n  {'stage':10s} {'notebook':>9s} {'script':>9s} {'added':>8s} {'kernel':>9s} {'paired: added':>14s} {'kernel':>7s}")
    for stage, seconds in figures["stage_s"]["notebooks"].items():
        script, kernel = figures["stage_s"]["scripts"][stage], figures["stage_s"]["kernel"][stage]
        paired = figures["paired_added_s"]
        print(f"  {stage:10s} {seconds:9.2f} {script:9.2f} {seconds - script:8.2f} {kernel:9.2f}"
              f" {paired['notebooks'][stage]:14.2f} {paired['kernel'][stage]:7.2f}")
    if "breakdown_per_stage" in figures:
        parts = list(next(iter(figures["breakdown_per_stage"].values()))["parts"])
        stages = list(figures["breakdown_per_stage"])
        print(f"\n  where the added seconds go (medians){'':4s}" + "".join(f"{stage:>10s}" for stage in stages))
        for part in ["added_s", *parts]:
            values = [figures["breakdown_per_stage"][stage]["parts"].get(part, figures["breakdown_per_stage"][stage].get(part))
                      for stage in stages]
            print(f"  {part:40s}" + "".join(f"{value:10.2f}" for value in values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold repros per variant (alternating); medians")
    parser.add_argument("--mlflow-runs", type=int, default=5, help="log_training_run calls to take the median of")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-cell breakdown (one script pass less)")
    parser.add_argument("--bytecode-cache", choices=("warm", "off"), default="warm",
                        help="warm: a private, pre-warmed bytecode cache, as a user's machine has after one run "
                             "(default); off: write no bytecode and use only what the venv holds (with a venv "
                             "installed without --compile-bytecode, every import compiles from source)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and logs, print where")
    parser.add_argument("--probe-mlflow", type=Path, help=argparse.SUPPRESS)   # internal: run inside a copy
    args = parser.parse_args()

    if args.probe_mlflow:
        print(json.dumps(probe_mlflow(args.probe_mlflow.resolve(), args.mlflow_runs)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="notebook_tax."))
    try:
        snapshot = snapshot_project(workdir / "snapshot")
        pycache = workdir / "pycache" if args.bytecode_cache == "warm" else None
        if pycache is not None:
            print("warming a private bytecode cache (one small, untimed repro) ...", flush=True)
            warm_bytecode_cache(snapshot, workdir, pycache)
        floor_project = make_floor_project(workdir, project_env(pycache=pycache))
        runs, checks, paired = [], [], []
        for repeat in range(args.repeats):
            # Rotate which variant goes first, so drift in machine load hits every side alike.
            variants = ("notebooks", "scripts", "kernel")
            order = variants[repeat % 3:] + variants[:repeat % 3]
            results = {}
            for variant in order:
                print(f"repeat {repeat + 1}/{args.repeats}: {variant} ...", flush=True)
                results[variant] = one_variant(snapshot, workdir, variant, repeat, not args.no_breakdown, pycache,
                                               floor_project)
                print(f"  cold {results[variant]['cold']['total_s']:.1f}s, no-op {results[variant]['noop_s']:.2f}s",
                      flush=True)
            checks.append(check_same_results(results["notebooks"], results["scripts"]))
            check_same_results(results["notebooks"], results["kernel"])   # in process or in a kernel: same data
            print(f"repeat {repeat + 1}/{args.repeats}: each stage once more in every variant, back to back ...",
                  flush=True)
            paired.append(paired_stage_runs({variant: results[variant]["project"] for variant in variants},
                                            list(results["notebooks"]["cold"]["stages"]), pycache, workdir, repeat))
            runs.append(results)
            if repeat < args.repeats - 1 and not args.keep:
                for result in results.values():   # keep the disk tidy; the last pair serves the probes
                    shutil.rmtree(result["project"])

        print("mlflow and fixed-cost probes ...", flush=True)
        last_notebooks = runs[-1]["notebooks"]["project"]
        probe = run([sys.executable, str(Path(__file__).resolve()), "--probe-mlflow", str(last_notebooks),
                     "--mlflow-runs", str(args.mlflow_runs)], last_notebooks, project_env(pycache=pycache))
        mlflow_figures = json.loads(probe.stdout.strip().splitlines()[-1])
        tools = tool_timings(5, workdir, project_env(pycache=pycache))

        record = build_record(args, runs, tools, mlflow_figures, checks, paired)
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(record, indent=2) + "\n")
        print_table(record)
        print(f"\nwrote {RESULT.relative_to(REPO)}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
