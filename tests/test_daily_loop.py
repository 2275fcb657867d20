"""The data scientist's daily loop: exploration in notebooks leaves the pipeline alone, experiments the DVC way,
provenance before promotion, commands that work as the docs show them, git hooks, CI workflows, the change report."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import BIN, REPO, copy_project, dvc, run

WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))


def plain_env(project: Path) -> dict:
    "A shell's environment without the venv on PATH: the commands must find it themselves."
    path = os.pathsep.join(entry for entry in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(entry).resolve() != BIN.resolve())
    return {"PATH": path}


# --- fast -------------------------------------------------------------------------------------------------------

def test_the_workflows_pass_actionlint():
    result = subprocess.run([str(BIN / "actionlint"), *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {path.name for path in WORKFLOWS} == {"test.yml", "pipeline.yml", "docs.yml"}


def test_every_workflow_step_runs_a_make_target():
    "CI runs what a user runs: each `run:` is `make <target>` for a target the Makefile has."
    targets = set(re.findall(r"^([a-z][\w-]*(?: [a-z][\w-]*)*):", (REPO / "Makefile").read_text(), re.M))
    targets = {name for line in targets for name in line.split()}
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job.get("steps", []):
                if "run" in step:
                    words = shlex.split(step["run"])
                    assert words[0] == "make" and len(words) == 2 and words[1] in targets, (path.name, step["run"])


def test_saving_a_notebook_in_jupyterlab_keeps_it_clean(tmp_path):
    "JupyterLab's save (its kernelspec, language_info) through nbdev's pre-save hook gives the committed bytes."
    from nbdev.clean import clean_jupyter
    shutil.copytree(REPO / "nbs", tmp_path / "nbs")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for name in ("stages/04_train.ipynb", "core/03_stage.ipynb"):
        path = tmp_path / "nbs" / name
        notebook = nbformat.read(path, as_version=4)
        notebook.metadata["kernelspec"] = {"display_name": "Python 3 (mlops-notebooks)", "language": "python",
                                           "name": "python3"}
        notebook.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
        model = {"type": "notebook", "content": notebook}
        clean_jupyter(path=str(path), model=model)  # what `make lab`'s pre_save_hook calls
        nbformat.write(model["content"], path)       # what JupyterLab then writes
        assert path.read_bytes() == (REPO / "nbs" / name).read_bytes(), name


def test_notebooks_are_committed_without_outputs():
    with_outputs = [path.relative_to(REPO).as_posix() for path in sorted((REPO / "nbs").rglob("*.ipynb"))
                    if any(cell.get("outputs") for cell in nbformat.read(path, 4).cells)]
    assert not with_outputs, f"notebooks committed with outputs: {with_outputs}"


def test_make_pipeline_ends_with_a_summary_table(repro_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    output = run([str(BIN / "mlops-notebooks"), "repro"], project).stdout
    table = output[output.index("stage "):].splitlines()
    assert table[0].split() == ["stage", "status", "duration"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-1]}
    assert set(rows) == {"ingest", "validate", "features", "train", "evaluate", "register", "monitor"}
    assert all(status == ["skipped", "-"] for status in rows.values()), rows
    assert table[-1].startswith("total")


# --- slow: git hooks, notebooks run as a person runs them, experiments, the report, the docs' commands -------------

@pytest.mark.slow
def test_pre_commit_passes_offline_and_refuses_a_notebook_with_outputs(tmp_path):
    project = copy_project(tmp_path / "project", params=None)
    hooks = run([str(BIN / "pre-commit"), "run", "--all-files"], project, check=False)
    assert hooks.returncode == 0, hooks.stdout + hooks.stderr
    # what `make hooks` does (not `make` itself: the copy's venv is this one, and make would reinstall it from the copy)
    run(["git", "config", "--local", "include.path", "../.gitconfig"], project)
    run([str(BIN / "pre-commit"), "install"], project)
    notebook = project / "nbs/stages/03_features.ipynb"
    executed = nbformat.read(notebook, as_version=4)
    executed.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="explored\n")]
    executed.metadata["language_info"] = {"name": "python"}
    nbformat.write(executed, notebook)
    run(["git", "add", str(notebook)], project)
    commit = run(["git", "commit", "-qm", "explored"], project, check=False, env=plain_env(project))
    assert commit.returncode != 0, "a notebook with outputs was committed"
    hooks_said = commit.stdout + commit.stderr  # pre-commit writes to git's stderr
    refused = next(line for line in hooks_said.splitlines() if line.startswith("notebooks committed without outputs"))
    assert refused.endswith("Failed") and "nbs/stages/03_features.ipynb" in hooks_said, hooks_said


def _client(store: Path):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")


def _runs(store: Path) -> list[tuple]:
    "(run id, name, status) of every run of every experiment, through MLflow's client."
    client = _client(store)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments) if experiments else []
    return sorted((run.info.run_id, run.info.run_name, run.info.status) for run in runs)


def _registry(store: Path) -> list[tuple]:
    "(name, version) of every model version, then (name, alias, version) of every alias, through MLflow's client."
    client = _client(store)
    models = sorted(client.search_registered_models(), key=lambda model: model.name)
    versions = sorted((version.name, int(version.version)) for model in models
                      for version in client.search_model_versions(f"name='{model.name}'"))
    aliases = sorted((model.name, alias, int(version)) for model in models for alias, version in model.aliases.items())
    return versions + aliases


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    "A project after `dvc repro`, then every stage notebook run top to bottom as JupyterLab runs it."
    from nbclient import NotebookClient
    project = copy_project(tmp_path_factory.mktemp("explored"))
    dvc(project, "repro")
    before = {"runs": _runs(project / "mlflow.db"), "registry": _registry(project / "mlflow.db"),
              "lock": (project / "dvc.lock").read_text()}
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_", "DVC_"))}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel starts with this environment: no MLOPS_PIPELINE_RUN, as in JupyterLab
    try:
        for path in sorted((project / "nbs/stages").glob("0*.ipynb")):
            notebook = nbformat.read(path, as_version=4)
            NotebookClient(notebook, kernel_name="python3", timeout=600,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return project, before


@pytest.mark.slow
def test_an_interactive_run_leaves_the_pipeline_untouched(explored):
    project, before = explored
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    assert (project / "dvc.lock").read_text() == before["lock"]
    assert _runs(project / "mlflow.db") == before["runs"], "an interactive run logged to the pipeline's store"
    assert _registry(project / "mlflow.db") == before["registry"], "an interactive run touched the registry"


@pytest.mark.slow
def test_an_interactive_run_writes_to_scratch(explored):
    project, _ = explored
    scratch = project / "scratch"
    for output in ("ingest/data/raw/claims.parquet", "features/data/processed/train.parquet",
                   "train/models/train_run.json", "evaluate/reports/metrics.json",
                   "register/reports/register_decision.json", "monitor/reports/monitor_verdict.json"):
        assert (scratch / output).is_file(), output
    trained = json.loads((scratch / "train/models/train_run.json").read_text())
    assert trained["run_id"] in {run[0] for run in _runs(scratch / "mlflow.db")}
    assert ("scratch-claims-cost", 1) in _registry(scratch / "mlflow.db")
    decision = json.loads((scratch / "register/reports/register_decision.json").read_text())
    assert decision["provenance"]["scratch_registry"] is True
    assert (scratch / "mlartifacts").is_dir() and not (project / "mlartifacts/2").exists()


SMALL = {"ingest": {"n_claims": 4000, "n_months": 12, "start_month": "2023-01"}, "features": {"test_months": 3},
         "train": {"max_iter": 40}, "evaluate": {"importance_rows": 500, "importance_repeats": 1}}


@pytest.fixture(scope="module")
def experimented(tmp_path_factory):
    "A committed project after `dvc repro`, then `.venv/bin/dvc exp run -S` from a shell without the venv on PATH."
    project = copy_project(tmp_path_factory.mktemp("experiment"), params=None)  # the repo's params.yaml, its layout
    from ruamel.yaml import YAML

    from mlops_notebooks.tools.pipeline import dvc_layout
    yaml_rt = YAML()
    params = yaml_rt.load((project / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    with open(project / "params.yaml", "w") as handle:
        yaml_rt.dump(params, handle)
    (project / "params.yaml").write_text(dvc_layout((project / "params.yaml").read_text()))
    run(["git", "commit", "-qam", "small params"], project)
    dvc(project, "repro")
    run(["git", "add", "dvc.lock"], project)
    run(["git", "commit", "-qm", "a pipeline run"], project)
    champion = _registry(project / "mlflow.db")
    params_before = (project / "params.yaml").read_text()
    result = run([".venv/bin/dvc", "exp", "run", "-S", "train.learning_rate=0.05"], project, env=plain_env(project))
    return project, result, champion, params_before


@pytest.mark.slow
def test_an_experiment_runs_without_the_venv_on_path_and_names_its_mlflow_run(experimented):
    project, result, _, _ = experimented
    name = re.search(r"Ran experiment\(s\): (\S+)", result.stdout + result.stderr).group(1)
    client = _client(project / "mlflow.db")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`lineage.dvc_experiment` != ''")
    # the train stage's run: named after the stage and the experiment, and tagged with the experiment
    assert [(run.info.run_name, run.data.tags["lineage.dvc_experiment"]) for run in runs] == [(f"train-{name}", name)]
    assert name in dvc(project, "exp", "show", "--only-changed", "--no-pager").stdout


@pytest.mark.slow
def test_an_experiment_changes_one_line_of_params_and_never_promotes(experimented):
    project, _, champion, params_before = experimented
    diff = [line for line in subprocess.run(["git", "diff", "-U0", "params.yaml"], cwd=project, capture_output=True,
                                            text=True).stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert diff == ["-  learning_rate: 0.1", "+  learning_rate: 0.05"], diff
    decision = json.loads((project / "reports/register_decision.json").read_text())
    assert decision["provenance"]["kind"] == "experiment" and decision["outcome"] != "promoted"
    aliases = {row for row in _registry(project / "mlflow.db") if len(row) == 3 and row[1] == "champion"}
    assert aliases == {row for row in champion if len(row) == 3 and row[1] == "champion"}, "@champion moved"


@pytest.mark.slow
def test_the_report_shows_the_param_and_the_metric_deltas(experimented):
    project, _, _, _ = experimented
    run(["git", "commit", "-qam", "learning rate 0.05"], project)
    report = run([str(BIN / "mlops-notebooks"), "report", "--against", "HEAD~1"], project).stdout
    assert "| train.learning_rate | 0.1 | 0.05 |" in report
    deviance = next(line for line in report.splitlines() if line.startswith("| metrics.json: mean_deviance |"))
    old, new, change = (cell.strip() for cell in deviance.split("|")[2:5])
    assert float(new) - float(old) == pytest.approx(float(change), rel=1e-3) and float(change) != 0
    assert "## The gate against the champion" in report
    # an experiment never promotes (the gate may also refuse it: A/E of a small experiment's test months is noisy)
    assert any(f"**{outcome}**" in report for outcome in ("passed_not_promoted", "kept_champion", "rejected"))
    assert "**promoted**" not in report
    page = run([str(BIN / "mlops-notebooks"), "report", "--against", "HEAD~1", "--format", "html"], project).stdout
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    unknown = run([str(BIN / "mlops-notebooks"), "report", "--against", "no-such-ref"], project, check=False)
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        f"error: report --against no-such-ref: no such git ref (a branch, tag or commit) in {project}"]


# --- every `.venv/bin/...` command the README and the docs show, as written -------------------------------------

def documented_commands() -> list[tuple[str, str]]:
    "(page, command) for each `.venv/bin/...` command in README.md and docs/*.md: code spans and code-block lines."
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        spans = re.findall(r"`(\.venv/bin/[^`]+)`", text)
        blocks = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                  for line in block.splitlines() if line.strip().startswith(".venv/bin/")]
        for command in spans + blocks:
            if command not in [seen for _, seen in found]:  # each command once, where it first appears
                found.append((page.relative_to(REPO).as_posix(), command))
    return found


def is_template(command: str) -> bool:
    "A command with a placeholder (`<name>`, `[--option]`): it is checked through its --help."
    return bool(re.search(r"<[^>]+>|\[", command))


@pytest.mark.slow
def test_every_documented_venv_command_works_as_written(tmp_path):
    commands = documented_commands()
    assert any("dvc exp run -S" in command for _, command in commands) and len(commands) >= 10
    project = copy_project(tmp_path / "project")
    if run(["git", "rev-parse", "--verify", "--quiet", "main"], project, check=False).returncode:
        run(["git", "branch", "main"], project)  # the docs compare with main
    dvc(project, "repro")
    run([str(BIN / "mlops-notebooks"), "remote"], project)  # `make remote`: the documented push/pull need it
    env = {**os.environ, **plain_env(project), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    env = {key: value for key, value in env.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
    failures = []
    for page, command in commands:
        words = shlex.split(command)
        if is_template(command):  # the subcommand exists and explains itself
            words = [word for word in words if not re.search(r"[<\[\]>]", word)][:2] + ["--help"]
        process = subprocess.Popen(words, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=600 if "exp run" in command else 60)
        except subprocess.TimeoutExpired:  # a server (mlflow ui): still serving after a minute is working
            os.killpg(process.pid, signal.SIGKILL)  # with its workers: a server's children outlive a killed parent
            process.communicate()
            continue
        if process.returncode != 0:
            failures.append(f"{page}: {command} -> exit {process.returncode}: {output.strip().splitlines()[-3:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_a_notebook_saved_through_jupyterlab_is_written_clean(tmp_path):
    "`make lab`'s server (its pre-save hook, from nbs/): JupyterLab's metadata on save, the committed bytes on disk."
    import socket
    import time
    import urllib.request
    shutil.copytree(REPO / "nbs", tmp_path / "nbs")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lab_line = next(line for line in (REPO / "Makefile").read_text().splitlines() if "jupyter lab" in line)
    assert lab_line.strip().startswith("cd nbs &&") and "pre_save_hook=nbdev.clean.clean_jupyter" in lab_line
    server = subprocess.Popen([str(BIN / "jupyter"), "lab", "--FileContentsManager.pre_save_hook=nbdev.clean.clean_jupyter",
                               "--no-browser", "--allow-root", f"--ServerApp.port={port}", "--IdentityProvider.token=t"],
                              cwd=tmp_path / "nbs", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/api/contents/stages/03_features.ipynb?token=t"
    try:
        for _ in range(120):
            try:
                notebook = json.load(urllib.request.urlopen(url))["content"]
                break
            except OSError:
                time.sleep(0.5)
        notebook["metadata"]["language_info"] = {"name": "python", "version": "3.11.7"}
        notebook["metadata"]["kernelspec"]["display_name"] = "Python 3 (mlops-notebooks)"
        body = json.dumps({"type": "notebook", "format": "json", "content": notebook}).encode()
        saved = urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT",
                                                              headers={"Content-Type": "application/json"}))
        assert saved.status == 200
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[1]
    assert (tmp_path / "nbs/stages/03_features.ipynb").read_bytes() == (REPO / "nbs/stages/03_features.ipynb").read_bytes()
    assert "Pre-save hook" not in log, log
