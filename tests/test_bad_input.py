"""A bad param, a broken or incomplete file, a missing input: one clear message, nothing half-written."""
import json

import pandas as pd
import pytest
import yaml
from conftest import BIN, copy_project, dvc, merge, run, write_params

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not


def _with_params(project, override):
    write_params(project, merge(yaml.safe_load((project / "params.yaml").read_text()), override))


def _failure(project, *args):
    "Run `dvc repro` (or the given args), expect it to fail, return everything it printed."
    result = dvc(project, *(args or ("repro",)), check=False)
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def test_a_wrongly_typed_param_is_named_and_writes_nothing(tmp_path):
    project = copy_project(tmp_path)
    _with_params(project, {"ingest": {"n_claims": "many"}})
    output = _failure(project)
    assert "ParamsError: params.yaml: ingest.n_claims: input should be a valid integer" in output
    assert "Traceback (most recent call last):\n  File \"<" not in output  # no traceback through our own code
    assert not (project / "data/raw/claims.parquet").exists()


def test_an_unknown_param_stops_its_stage_and_leaves_no_model(tmp_path):
    project = copy_project(tmp_path)
    _with_params(project, {"train": {"learning_rat": 0.3}})
    output = _failure(project)
    assert "ParamsError: params.yaml: train.learning_rat: unknown key" in output
    assert (project / "data/processed/train.parquet").exists(), "the stages before train ran"
    assert not (project / "models/claims_cost_model").exists()
    assert not (project / "models/train_run.json").exists()
    leftovers = [path.name for path in (project / "models").glob(".*")] if (project / "models").exists() else []
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_a_broken_csv_is_named(tmp_path):
    project = copy_project(tmp_path)
    (project / "data/sources/claims.csv").write_text("claim_id,report_month\n1,2023-01\n2,2023-02,extra,fields\n")
    _with_params(project, {"data": {"source": "data/sources/claims.csv"}})
    output = _failure(project)
    assert "DataError:" in output and "claims.csv: not a well-formed CSV" in output
    assert not (project / "data/raw/claims.parquet").exists()


def _claims_csv(project, rows=2000):
    from mlops_notebooks.stages.generator import generate_claims
    return generate_claims(rows, "2023-01", 12, seed=0)


def test_a_csv_missing_a_column_stops_validation(tmp_path):
    project = copy_project(tmp_path)
    _claims_csv(project).drop(columns=["litigation"]).to_csv(project / "data/sources/claims.csv", index=False)
    _with_params(project, {"data": {"source": "data/sources/claims.csv"}})
    output = _failure(project)
    assert "DataError: data/sources/claims.csv: declared column(s) missing: 'litigation' (data.numeric)" in output
    assert not (project / "data/interim/claims.parquet").exists()
    assert not (project / "data/quarantine/claims.parquet").exists()


def test_a_few_bad_rows_are_quarantined_with_their_reason(tmp_path):
    project = copy_project(tmp_path)
    claims = _claims_csv(project)
    claims.loc[5, "ultimate_cost"] = -1.0
    claims.loc[9, "region"] = "atlantis"
    claims.to_csv(project / "data/sources/claims.csv", index=False)
    _with_params(project, {"data": {"source": "data/sources/claims.csv"}})
    dvc(project, "repro", "validate")
    import json

    import pandas as pd
    quarantine = pd.read_parquet(project / "data/quarantine/claims.parquet")
    assert sorted(quarantine["claim_id"]) == [6, 10]
    reasons = dict(zip(quarantine["claim_id"], quarantine["reason"], strict=True))
    assert reasons[6] == "ultimate_cost: greater_than(0)" and reasons[10].startswith("region: isin(")
    clean = pd.read_parquet(project / "data/interim/claims.parquet")
    assert len(clean) == 1998 and not clean["claim_id"].isin([6, 10]).any()
    summary = json.loads((project / "reports/validation.json").read_text())
    assert summary["quarantined"] == 2 and summary["rows"] == 1998


def test_too_many_bad_rows_stop_validation_naming_column_and_problem(tmp_path):
    project = copy_project(tmp_path)
    claims = _claims_csv(project)
    claims.loc[:39, "ultimate_cost"] = -1.0   # 40 of 2000 rows = 2%, over the 1% allowed
    claims.to_csv(project / "data/sources/claims.csv", index=False)
    _with_params(project, {"data": {"source": "data/sources/claims.csv"}})
    output = _failure(project)
    assert ("DataError: data/sources/claims.csv: 40 of 2,000 rows (2.00%) break the schema, "
            "more than validate.max_quarantine_share=0.01") in output
    assert "column 'ultimate_cost': 40 value(s) fail greater_than(0): -1.0 (first at row 0)" in output
    assert not (project / "data/interim/claims.parquet").exists()
    assert not (project / "data/quarantine/claims.parquet").exists()


def test_a_missing_input_names_the_stage_that_makes_it(tmp_path):
    project = copy_project(tmp_path)
    (project / "reports").mkdir(exist_ok=True)
    result = run([str(BIN / "papermill"), "--log-level", "ERROR", "nbs/stages/03_features.ipynb",
                  "reports/03_features.ipynb", "-f", "params.yaml"], project, check=False)
    assert result.returncode != 0
    assert ("DataError: " + str(project / "data/interim/claims.parquet") +
            ": input not found; it is written by the 'validate' stage") in result.stderr
    assert not (project / "data/processed").exists()


# --- a failed stage destroys nothing ---------------------------------------------------------------------------

def _copy_of_a_good_run(repro_project, destination):
    "A copy of the project after a good `dvc repro` (the shared one stays as it is)."
    import shutil
    shutil.copytree(repro_project, destination, symlinks=True)
    return destination


def _fingerprints(project, paths):
    from mlops_notebooks.core.artifacts import file_md5
    return {path: file_md5(project / path) for path in paths}


def test_a_stage_stopped_by_a_bad_param_keeps_the_last_good_outputs(repro_project, tmp_path):
    import json
    project = _copy_of_a_good_run(repro_project, tmp_path / "project")
    kept = ["models/claims_cost_model/MLmodel", "models/claims_cost_model/model.pkl", "models/train_run.json",
            "reports/metrics.json", "reports/register_decision.json", "data/processed/train.parquet"]
    before = _fingerprints(project, kept)
    _with_params(project, {"train": {"learning_rat": 0.3}})
    output = _failure(project)
    # one line for the error, one for where the notebook stopped and what was put back; no traceback
    assert "ParamsError: params.yaml: train.learning_rat: unknown key\n(nbs/stages/04_train.ipynb stopped at cell [" in output
    assert ("; the failed run's notebook: reports/failed/04_train.ipynb; the last good outputs are back from DVC's "
            "cache: models/claims_cost_model, models/train_run.json, reports/04_train.ipynb)") in output, output
    assert "Traceback" not in output, output
    assert _fingerprints(project, kept) == before, "the last good model and everything downstream stay as they were"
    status = json.loads(dvc(project, "status", "--json").stdout)
    assert "changed outs" not in json.dumps(status), status  # every output is the locked one again
    assert "learning_rat" in (project / "reports/failed/04_train.ipynb").read_text()
    assert [path.name for path in (project / "models").iterdir() if path.name.startswith(".")] == []


def test_a_failed_register_keeps_the_decision_record(repro_project, tmp_path):
    project = _copy_of_a_good_run(repro_project, tmp_path / "project")
    before = _fingerprints(project, ["reports/register_decision.json"])
    _with_params(project, {"register": {"min_relative_improvement": "high"}})
    output = _failure(project)
    assert "ParamsError: params.yaml: register.min_relative_improvement: input should be a valid number" in output
    assert _fingerprints(project, ["reports/register_decision.json"]) == before


def test_a_valid_rule_of_ones_own_passes_the_register_stage(repro_project, tmp_path):
    "The register notebook's examples use their own rule, not the user's: any valid rule runs."
    project = _copy_of_a_good_run(repro_project, tmp_path / "project")
    _with_params(project, {"register": {"primary_metric": "rmse", "max_prediction_ratio": 1.5}})
    dvc(project, "repro", "register")
    import json
    decision = json.loads((project / "reports/register_decision.json").read_text())
    assert decision["rule"]["primary_metric"] == "rmse" and decision["rule"]["max_prediction_ratio"] == 1.5


def test_an_unreadable_incoming_batch_is_set_aside_and_the_pipeline_goes_on(tmp_path):
    "One unreadable file in data/incoming/ is named, recorded and left where it is; the readable batches join."
    from mlops_notebooks.stages.generator import generate_claims
    project = copy_project(tmp_path)
    incoming = project / "data/incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    generate_claims(300, "2024-01", 1, seed=7, first_claim_id=10**7).to_csv(incoming / "2024-01.csv", index=False)
    broken = b"claim_id,region\n1,\xff\xfenorth\n"  # not UTF-8, and unlabelled
    (incoming / "2024-02.csv").write_bytes(broken)
    result = dvc(project, "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "data/incoming/2024-02.csv: set aside, not read: not UTF-8 text" in output, output
    assert (incoming / "2024-02.csv").read_bytes() == broken, "the file stays where it was, as it was"
    record = json.loads((project / "data/quarantine/incoming.json").read_text())
    assert [entry["file"] for entry in record["set_aside"]] == ["data/incoming/2024-02.csv"]
    assert record["set_aside"][0]["reason"].startswith("not UTF-8 text") and len(record["set_aside"][0]["md5"]) == 32
    raw = pd.read_parquet(project / "data/raw/claims.parquet")
    assert (raw["claim_id"] >= 10**7).sum() == 300, "the readable labelled batch joined the claims"
    verdict = json.loads((project / "reports/monitor_verdict.json").read_text())
    assert verdict["verdict"] == "invalid" and "2024-02.csv" in verdict["problems"][0], "the monitor still sees it"


def test_a_stage_killed_holding_its_mlflow_run_leaves_nothing_running_after_the_next_run(repro_project, tmp_path):
    """kill -9 of `dvc repro` while a stage holds its MLflow run open (train logging its model, or evaluate adding the
    test metrics): the run stays RUNNING, the stage's mark stays in the checkout. The next `dvc repro` ends the run as
    KILLED (saying so), runs the stages, and leaves no run RUNNING and no mark behind."""
    import os
    import signal
    import subprocess
    import time

    from conftest import project_env
    from mlflow import MlflowClient
    project = copy_project(tmp_path / "project")  # its own checkout: runs are tagged with the folder they started in
    dvc(project, "repro")
    run(["git", "add", "dvc.lock"], project)
    run(["git", "commit", "-qm", "a pipeline run"], project)
    _with_params(project, {"train": {"max_iter": 41}})  # train, evaluate and register run again
    run(["git", "commit", "-qam", "one more iteration"], project)
    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]

    def running():
        return [found.info.run_id for found in client.search_runs(experiments, "attributes.status = 'RUNNING'")]

    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=project_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not running():
        assert repro.poll() is None, "the stages ended before one was caught holding its run"
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    left = running()
    assert len(left) == 1 and (project / ".stage-running.json").exists(), left

    again = dvc(project, "repro")
    assert f"MLflow run {left[0]} was left RUNNING by a killed stage of this checkout: ended as KILLED" in again.stderr
    assert running() == [] and not (project / ".stage-running.json").exists()
    assert "mlops.ended_by" in client.get_run(left[0]).data.tags
