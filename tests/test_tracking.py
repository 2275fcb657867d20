"""The MLflow UI a person can read: run names, descriptions, datasets, the decision as an artifact, the executed reports.

Read through the MLflow client from a project on which `dvc repro` has run (the UI shows what the client returns).
"""
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, dvc
from mlflow import MlflowClient

from mlops_notebooks.core.tracking import read_decision

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    # A project of its own: copies of the shared `repro_project` keep its MLflow experiment, whose artifact location
    # is the original's mlartifacts/, so their register and evaluate runs add artifacts to the original's runs.
    project = copy_project(tmp_path_factory.mktemp("tracked"))
    dvc(project, "repro")
    uri = f"sqlite:///{project}/mlflow.db"  # both named: an earlier test may have set the process-wide registry URI
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    trained = json.loads((project / "models/train_run.json").read_text())
    return project, client, client.get_run(trained["run_id"])


def _locked_md5(project, path):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", []) if out["path"] == path)


def test_runs_are_named_after_their_stage_and_commit(tracked):
    project, client, run = tracked
    commit = run.data.tags["lineage.git_commit"]
    assert run.info.run_name == f"train-{commit[:6]}"
    assert re.fullmatch(r"train-[0-9a-f]{6}", run.info.run_name)


def test_runs_and_versions_have_a_description(tracked):
    project, client, run = tracked
    description = run.data.tags["mlflow.note.content"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    decision = json.loads((project / "reports/register_decision.json").read_text())
    assert description.startswith("**ultimate_cost** model: `hist_gradient_boosting` with the gamma objective")
    assert run.data.tags["training_window"] in description
    assert f"mean_deviance {metrics['mean_deviance']:.4g}" in description
    assert f"Gate: **{decision['outcome']}**" in description
    version = client.get_model_version(decision["model_name"], str(decision["challenger"]["version"]))
    assert version.description == description
    assert version.tags["lineage.evaluation_window"] in description


def test_the_dataset_column_shows_the_data_by_its_dvc_hash(tracked):
    project, client, run = tracked
    inputs = {entry.dataset.name: entry for entry in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "test"}
    for name, context in (("train", "training"), ("test", "evaluation")):
        dataset = inputs[name].dataset
        path = f"data/processed/{name}.parquet"
        assert dataset.digest == _locked_md5(project, path) and dataset.source_type == "dvc"
        assert json.loads(dataset.source)["path"] == path
        assert json.loads(dataset.profile)["num_rows"] > 0
        assert [(tag.key, tag.value) for tag in inputs[name].tags] == [("mlflow.data.context", context)]


def test_the_decision_is_an_artifact_with_a_short_summary(tracked):
    project, client, run = tracked
    decision = json.loads((project / "reports/register_decision.json").read_text())
    version = client.get_model_version(decision["model_name"], str(decision["challenger"]["version"]))
    assert version.tags["decision.outcome"] == decision["outcome"]
    assert version.tags["decision.reason"] == "first champion: every sanity check passed"
    assert "decision.record" not in version.tags and all(len(value) <= 300 for key, value in version.tags.items()
                                                          if key.startswith("decision."))
    assert read_decision(version.tags, client) == decision
    logged = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "decisions")]
    # one numbered record per decision on a version: decisions/v<version>-<n>-<time>.json (append-only)
    assert len(logged) == 1 and logged[0].startswith(f"decisions/v{decision['challenger']['version']}-001-")


def test_the_executed_reports_are_the_runs_artifacts(tracked, tmp_path):
    project, client, run = tracked
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "reports")}
    assert logged == {"reports/04_train.ipynb", "reports/05_evaluate.ipynb", "reports/06_register.ipynb"}
    decision = json.loads((project / "reports/register_decision.json").read_text())
    version = client.get_model_version(decision["model_name"], str(decision["challenger"]["version"]))
    assert set(version.tags["lineage.reports"].split(",")) == logged, "the reports the version's lineage names"
    downloaded = client.download_artifacts(run.info.run_id, "reports/06_register.ipynb", str(tmp_path))
    notebook = json.loads(Path(downloaded).read_text())
    assert notebook["metadata"]["papermill"]["exception"] is None, "the whole executed notebook, as the stage ended"
    assert f"version {decision['challenger']['version']} (new): {decision['outcome']}" in json.dumps(notebook["cells"])
