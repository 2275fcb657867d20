"""The notebook tax: what running the pipeline's stages as papermill notebooks costs over the same stages as plain
Python scripts, and what DVC's bookkeeping around them costs.

Everything runs in throw-away copies of the project (a fresh git repo each, the repo's params.yaml, no dvc.lock):

1. cold `dvc repro` of the notebook stages, and of the same pipeline with every stage's command replaced by
   `python scripts/<stage>.py`, written by `support/script_stages.py` from the cells the stage engine runs: the same
   code and outputs, no papermill, no IPython and no executed report. The two run back to
   back in each repeat, taking turns to go first; `ratio` is the median of the repeats' ratios. Both must write the
   same data (the md5s in their dvc.lock);
2. no-op `dvc repro` (nothing changed), each right after a no-op of a one-stage DVC project: DVC's own floor at
   that moment, so `noop_over_floor_s` is what this pipeline adds to DVC itself;
3. DVC's run cache: `train.learning_rate` changed and `dvc repro` (the stages re-run), then back and again, a few
   times: each repro after the first restores the earlier outputs from the run cache instead of running the stages
   (`restore_previous_params_s`, and which stages were restored);
4. MLflow's cost per training run (`benchmarks/support/mlflow_probe.py`, in the last notebooks copy).

Usage: python benchmarks/notebook_tax.py --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.script_stages import write_stage_script  # noqa: E402
from support.stage_runs import BIN, REPO, copy_test_project, merge, project_env, run  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "notebook_tax.json"
GOALS = {
    "ratio": {"max": 1.25},
    "added_per_stage_s": {"max": 0.7},
    # A no-op `dvc repro` of any project costs DVC's own start-up and bookkeeping (the floor: one stage, one file
    # in, one out); the goal is on what this pipeline adds to that, which is the part the project controls.
    "noop_over_floor_s": {"max": 0.5},
    "mlflow_overhead_per_run_s": {"max": 1.5},
    "restore_previous_params_s": {"max": 3.0},
}
RUNNING = re.compile(r"Running stage '([^']+)'")
RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")


def median(values) -> float:
    return round(statistics.median(values), 3)


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def as_scripts(project: Path):
    "Every stage's command becomes its generated script (`script_stages.py`); the executed report is no longer an output."
    dvc_file = project / "dvc.yaml"
    pipeline = yaml.safe_load(dvc_file.read_text())
    for name, stage in pipeline["stages"].items():
        tokens = stage["cmd"].split()
        notebook = next(token for token in tokens if token.endswith(".ipynb") and not token.startswith("reports/"))
        report = next(token for token in tokens if token.startswith("reports/"))
        script = write_stage_script(project, notebook, name)
        stage["cmd"] = f"python {script}"
        stage["deps"].append(script)  # the notebook stays a dep: `start_stage` reads its contract
        stage["outs"] = [out for out in stage.get("outs", []) if out != report]
        if not stage["outs"]:
            del stage["outs"]
    dvc_file.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(["git", "add", "-A"], project, project_env())
    run(["git", "commit", "-qm", "stages as scripts"], project, project_env())


def fresh_copy(snapshot: Path, destination: Path, variant: str, params: dict | None = None) -> Path:
    "A copy of the committed snapshot, as notebooks or as scripts (optionally with other params)."
    shutil.copytree(snapshot, destination, symlinks=True)
    if params is not None:
        (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "commit", "-qam", "other params"], destination, project_env())
    if variant == "scripts":
        as_scripts(destination)
    return destination


def timed_repro(project: Path, log: Path | None = None) -> dict:
    "One `dvc repro`: wall seconds, seconds per stage (from DVC's announcements), the stages restored from its cache."
    load_before, started, marks, restored = load_1m(), time.perf_counter(), [], []
    process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=project_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in process.stdout:
        now = time.perf_counter() - started
        lines.append(f"{now:8.3f} {line}")
        if match := RUNNING.search(line):
            marks.append((match.group(1), now))
        if match := RESTORED.search(line):
            restored.append(match.group(1))
    code, total = process.wait(), time.perf_counter() - started
    if log is not None:
        log.write_text("".join(lines))
    if code != 0:
        raise SystemExit(f"dvc repro failed in {project} ({code}):\n" + "".join(lines[-40:]))
    ends = [when for _, when in marks[1:]] + [total]
    return {"s": total, "load_1m": [load_before, load_1m()], "restored": restored,
            "stages": {name: end - begin for (name, begin), end in zip(marks, ends)}}


def locked_md5s(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])}


def same_data(notebooks: Path, scripts: Path) -> int:
    "The data outputs both forms wrote must be identical (model folders carry run ids, so only data/ is compared)."
    left, right = locked_md5s(notebooks), locked_md5s(scripts)
    data = sorted(path for path in left if path.startswith("data/") and path in right)
    differing = [path for path in data if left[path] != right[path]]
    if not data or differing:
        raise SystemExit(f"the notebooks and the scripts wrote different data: {differing or 'none compared'}")
    return len(data)


def floor_project(workdir: Path) -> Path:
    "DVC's floor: a git + DVC project with one stage (one file in, one out), run once so a repro is a no-op."
    floor = workdir / "floor"
    floor.mkdir()
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                    [str(BIN / "dvc"), "config", "core.analytics", "false"]):
        run(command, floor, project_env())
    (floor / "input.txt").write_text("claims\n")
    (floor / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp input.txt output.txt\n"
                                    "    deps: [input.txt]\n    outs: [output.txt]\n")
    timed_repro(floor)
    return floor


def noop_pairs(project: Path, floor: Path, count: int) -> list[dict]:
    "`count` no-op repros of the project, each right after one of the floor project: the machine's speed then."
    pairs = []
    for _ in range(count):
        floor_run, noop_run = timed_repro(floor), timed_repro(project)
        if floor_run["stages"] or noop_run["stages"]:
            raise SystemExit(f"a no-op repro ran {sorted(noop_run['stages']) or sorted(floor_run['stages'])}")
        pairs.append({"floor_s": floor_run["s"], "noop_s": noop_run["s"], "load_1m": noop_run["load_1m"][0]})
    return pairs


def restore_runs(project: Path, floor: Path, count: int, workdir: Path) -> dict:
    """Change train.learning_rate and repro (the stages run), then go back and forth `count` times: each of those
    repros finds the params in DVC's run cache and restores the outputs it recorded for them (each right after a
    no-op of the floor project, as the no-ops are)."""
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    changed = yaml.safe_dump(merge(params, {"train": {"learning_rate": params["train"]["learning_rate"] * 2}}),
                             sort_keys=False)
    (project / "params.yaml").write_text(changed)
    first = timed_repro(project, workdir / "params-changed.log")
    samples = []
    for index in range(count):
        (project / "params.yaml").write_text(original if index % 2 == 0 else changed)
        floor_s = timed_repro(floor)["s"]
        restore = {**timed_repro(project, workdir / f"restore-{index}.log"), "floor_s": floor_s}
        if restore["stages"]:
            raise SystemExit(f"going back to earlier params re-ran {sorted(restore['stages'])} instead of restoring")
        samples.append(restore)
    (project / "params.yaml").write_text(original)
    return {"changed_params_repro_s": round(first["s"], 3), "changed_params_ran": sorted(first["stages"]),
            "samples": samples}


def build_record(args, cold: list[dict], noops: list[dict], restore: dict, mlflow: dict, same: int,
                 loads: list) -> dict:
    notebooks, scripts = [pair["notebooks"] for pair in cold], [pair["scripts"] for pair in cold]
    stages = list(notebooks[0]["stages"])
    ratios = [nb["s"] / sc["s"] for nb, sc in zip(notebooks, scripts)]
    figures = {
        "cold_repro_notebooks_s": median(run["s"] for run in notebooks),
        "cold_repro_scripts_s": median(run["s"] for run in scripts),
        "ratio": median(ratios),  # each repeat's two repros ran back to back: one machine speed
        "added_per_stage_s": median((nb["s"] - sc["s"]) / len(stages) for nb, sc in zip(notebooks, scripts)),
        "ratio_per_repeat": [round(ratio, 3) for ratio in ratios],
        "stages": len(stages),
        "stage_s": {variant: {stage: median(run["stages"][stage] for run in runs) for stage in stages}
                    for variant, runs in (("notebooks", notebooks), ("scripts", scripts))},
        "cold_repro_runs": [{variant: {"s": round(pair[variant]["s"], 3), "load_1m": pair[variant]["load_1m"]}
                             for variant in pair} for pair in cold],
        "noop_repro_s": median(pair["noop_s"] for pair in noops),
        "noop_floor_s": median(pair["floor_s"] for pair in noops),
        "noop_over_floor_s": median(pair["noop_s"] - pair["floor_s"] for pair in noops),
        "noop_pairs": [{key: round(value, 3) for key, value in pair.items()} for pair in noops],
        "restore_previous_params_s": median(sample["s"] for sample in restore["samples"]),
        "restore_over_floor_s": median(sample["s"] - sample["floor_s"] for sample in restore["samples"]),
        "restore_samples_s": [round(sample["s"], 3) for sample in restore["samples"]],
        "restore_floor_samples_s": [round(sample["floor_s"], 3) for sample in restore["samples"]],
        "restored_stages": sorted(set().union(*(sample["restored"] for sample in restore["samples"]))),
        "changed_params_repro_s": restore["changed_params_repro_s"],
        "changed_params_ran": restore["changed_params_ran"],
        **mlflow,
        "data_outputs_identical": same,
    }
    return {"benchmark": "notebook_tax", "date": datetime.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_1m": loads},
            "command": f"python benchmarks/notebook_tax.py --repeats {args.repeats} --noops {args.noops} "
                       f"--restores {args.restores}",
            "figures": figures, "goals": GOALS}


def print_summary(record: dict):
    figures = record["figures"]
    print(f"\nnotebook_tax ({record['date']}, {record['command']})")
    for name, value in figures.items():
        if isinstance(value, (int, float, str)):
            goal = record["goals"].get(name)
            verdict = "" if goal is None else f"   goal <= {goal['max']}: {'met' if value <= goal['max'] else 'MISSED'}"
            print(f"  {name:32s} {value}{verdict}")
    print(f"  ratio per repeat: {figures['ratio_per_repeat']}; restored: {', '.join(figures['restored_stages'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold repros of each form (back to back); medians")
    parser.add_argument("--noops", type=int, default=3, help="no-op repros after each repeat's cold notebooks repro")
    parser.add_argument("--restores", type=int, default=5, help="repros restoring from the run cache; median")
    parser.add_argument("--mlflow-runs", type=int, default=5, help="log_training_run calls to take the median of")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and logs, print where")
    parser.add_argument("--quick", action="store_true", help="a smoke run on params.small.yaml; writes no record")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="notebook_tax."))
    loads = [load_1m()]
    try:
        snapshot = copy_test_project(workdir / "snapshot", params=None)  # one snapshot: the repo may change meanwhile
        print("warm-up: both forms on params.small.yaml (untimed; checks the scripts write the same data) ...",
              flush=True)
        small = merge(yaml.safe_load((snapshot / "params.yaml").read_text()),
                      yaml.safe_load((snapshot / "params.small.yaml").read_text()))
        warm = {variant: fresh_copy(snapshot, workdir / f"warm-{variant}", variant, small)
                for variant in ("notebooks", "scripts")}
        for project in warm.values():
            timed_repro(project)
        same_data(warm["notebooks"], warm["scripts"])
        for project in warm.values():
            shutil.rmtree(project)
        floor = floor_project(workdir)

        cold, noops = [], []
        for repeat in range(args.repeats):
            order = ("notebooks", "scripts") if repeat % 2 == 0 else ("scripts", "notebooks")
            pair, copies = {}, {}
            for variant in order:
                copies[variant] = fresh_copy(snapshot, workdir / f"{variant}-{repeat}", variant,
                                             small if args.quick else None)
                pair[variant] = timed_repro(copies[variant], workdir / f"{variant}-{repeat}.log")
                print(f"repeat {repeat + 1}/{args.repeats} {variant}: {pair[variant]['s']:.1f} s "
                      f"(load {pair[variant]['load_1m']})", flush=True)
            same = same_data(copies["notebooks"], copies["scripts"])
            noops += noop_pairs(copies["notebooks"], floor, args.noops)
            cold.append(pair)
            loads.append(load_1m())
            if repeat < args.repeats - 1:
                for project in copies.values():
                    shutil.rmtree(project)

        print("run cache: a params change and back ...", flush=True)
        restore = restore_runs(copies["notebooks"], floor, args.restores, workdir)
        print("MLflow per training run ...", flush=True)
        probe = run([sys.executable, "benchmarks/support/mlflow_probe.py", str(args.mlflow_runs)],
                    copies["notebooks"], project_env())
        mlflow = json.loads(probe.stdout.strip().splitlines()[-1])
        loads.append(load_1m())

        record = build_record(args, cold, noops, restore, mlflow, same, loads)
        print_summary(record)
        if not args.quick:
            RESULT.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {RESULT.relative_to(REPO)}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
