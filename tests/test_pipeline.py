"""End to end: `dvc repro` in a throw-away copy of the project, with small params."""
import json
import math
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import copy_project, dvc, merge, set_params, write_params

from mlops_notebooks.core.artifacts import file_md5


def _declared_outputs(project):
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                yield name, next(iter(entry)) if isinstance(entry, dict) else entry


def _locked_hashes(project, prefix="data/"):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
            if out["path"].startswith(prefix)}


def test_every_declared_output_is_written(repro_project):
    missing = [f"{stage}: {path}" for stage, path in _declared_outputs(repro_project)
               if not (repro_project / path).exists()]
    assert not missing, missing
    assert "modified" not in dvc(repro_project, "status").stdout


def test_metrics_are_sane(repro_project):
    metrics = json.loads((repro_project / "reports/metrics.json").read_text())
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["rows"] > 1000
    # A gradient-boosting model on the generated claims must beat a constant model clearly, and rank well.
    assert 0.2 < metrics["d2"] < 1.0, metrics
    assert 0.3 < metrics["gini"] < 1.0, metrics
    assert 0.5 < metrics["mean_predicted"] / metrics["mean_actual"] < 1.5, metrics


def test_the_mlflow_run_carries_the_lineage(repro_project):
    run_record = json.loads((repro_project / "models/train_run.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{repro_project}/mlflow.db")
    run = mlflow.get_run(run_record["run_id"])
    tags, hashes = run.data.tags, _locked_hashes(repro_project)
    commit = dvc(repro_project, "version").stdout and __import__("subprocess").run(
        ["git", "rev-parse", "HEAD"], cwd=repro_project, capture_output=True, text=True).stdout.strip()
    assert tags["lineage.git_commit"] == commit
    assert tags["lineage.git_dirty"] == "false", "dvc.lock and outputs must not make the tree count as dirty"
    assert tags["lineage.data.data/processed/train.parquet"] == hashes["data/processed/train.parquet"]
    assert tags["lineage.data.data/processed/test.parquet"] == hashes["data/processed/test.parquet"]
    assert tags["lineage.params.train.max_iter"] == "40"
    assert tags["lineage.reports"] == "reports/04_train.ipynb,reports/05_evaluate.ipynb"
    assert run.data.params["data.objective"] == "gamma"
    assert run.data.metrics["test_d2"] == json.loads((repro_project / "reports/metrics.json").read_text())["d2"]
    logged = mlflow.get_logged_model(run_record["model_id"])
    assert logged.source_run_id == run_record["run_id"]


@pytest.mark.slow
def test_a_leftover_plot_is_neither_read_nor_logged(repro_project, tmp_path):
    "An older version's file in reports/plots/ neither trips evaluate's undeclared-read guard nor reaches MLflow."
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    (project / "reports/plots/error_by_month.png").write_bytes(b"an older evaluate's plot")
    dvc(project, "repro", "--force", "--single-item", "evaluate")
    run_id = json.loads((project / "models/train_run.json").read_text())["run_id"]
    uri = f"sqlite:///{project}/mlflow.db"  # both named: an earlier test may have set the process-wide registry URI
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = {Path(artifact.path).name for artifact in client.list_artifacts(run_id, "plots")}
    assert logged == {"predicted_vs_actual.png", "error_by_group.png", "feature_importance.png"}


@pytest.mark.slow
def test_a_train_param_reruns_train_and_downstream_only(tmp_path):
    project = copy_project(tmp_path)
    dvc(project, "repro")
    params = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, merge(params, {"train": {"learning_rate": 0.2}}))
    status = json.loads(dvc(project, "status", "--json").stdout)
    # only train reads the train params (evaluate has not since the declared-data change); evaluate, register and
    # monitor see a change once train has written a new model
    assert sorted(status) == ["train"], status
    output = dvc(project, "repro").stdout
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
    skipped = {line.split("'")[1] for line in output.splitlines() if line.startswith("Stage '") and "didn't change" in line}
    # the monitor re-judges data/incoming whenever the gate has decided again (a new champion may serve)
    assert ran == {"train", "evaluate", "register", "monitor"}, output
    assert skipped == {"ingest", "validate", "features"}, output


@pytest.mark.slow
def test_two_fresh_repros_give_the_same_data_and_metrics(repro_project, tmp_path):
    again = copy_project(tmp_path)
    dvc(again, "repro")
    assert _locked_hashes(again) == _locked_hashes(repro_project)
    assert len(_locked_hashes(again)) == 6  # raw, interim, quarantine, its incoming record, train, test
    assert (json.loads((again / "reports/metrics.json").read_text())
            == json.loads((repro_project / "reports/metrics.json").read_text()))
    assert file_md5(again / "data/raw/claims.parquet") == file_md5(repro_project / "data/raw/claims.parquet")


# --- re-runs follow the code a stage runs ------------------------------------------------------------------------

ORDER = ["ingest", "validate", "features", "train", "evaluate", "register", "monitor"]


def _downstream(stage: str) -> set:
    "The stage and every stage after it (the pipeline is a chain, with monitor last)."
    return set(ORDER[ORDER.index(stage):])


def _stages_to_rerun(project: Path, module: Path) -> set:
    "The stages `dvc status` reports after one line is added to `module` (the edit is undone afterwards)."
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        return set(json.loads(dvc(project, "status", "--json").stdout))
    finally:
        module.write_text(original)


def test_an_edit_reruns_exactly_the_stages_that_run_the_code(repro_project, tmp_path):
    "Edit each library module in a copy: platform code above the stages re-runs nothing, a stage module its stage."
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    found = {}
    for module in sorted((project / "mlops_notebooks").rglob("*.py")):
        if module.name in ("__init__.py", "_modidx.py"):
            continue
        found[module.relative_to(project / "mlops_notebooks").as_posix()] = _stages_to_rerun(project, module)
    for name, stages in found.items():
        room, stem = name.split("/")[0], Path(name).stem
        if room in ("serving", "tools") or name == "core/engine.py":
            assert stages == set(), f"editing {name} would re-run {stages}"
        elif room == "stages" and stem.removesuffix("_dask") in ORDER:
            own = stem.removesuffix("_dask")
            assert own in stages and stages <= _downstream(own), f"editing {name} would re-run {stages}"
    # pinned: the code each stage really runs
    assert found["stages/generator.py"] == {"ingest"}
    assert found["stages/train.py"] == {"train", "evaluate", "register"}
    assert found["stages/train_dask.py"] == {"train"}
    assert found["stages/schema.py"] == set(ORDER) == found["core/settings.py"]
    assert found["core/registry.py"] == {"evaluate", "register", "monitor"}  # evaluate checks its training run is there
    assert found["core/predictions.py"] == {"monitor"}


def test_going_back_to_earlier_params_restores_from_the_run_cache(repro_project, tmp_path):
    "DVC's run cache: after a params change and back, the earlier outputs come back without running the stages."
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    before = _locked_hashes(project, prefix="")
    original = (project / "params.yaml").read_text()
    set_params(project, {"train": {"learning_rate": 0.2}})
    dvc(project, "repro")
    (project / "params.yaml").write_text(original)
    output = dvc(project, "repro").stdout
    restored = {line.split("'")[1] for line in output.splitlines() if "is cached - skipping run" in line}
    assert restored == {"train", "evaluate", "register", "monitor"}, output
    assert "Running stage" not in output, output
    assert _locked_hashes(project, prefix="") == before
