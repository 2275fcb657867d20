"""The shared team setup, end to end on loopback: the team stack (PostgreSQL, `mlflow server` with basic auth and S3
artifacts, SeaweedFS, a Dask scheduler with two workers) is started by `mlops_notebooks.tools.team.start_stack` and
stopped by pid; the unchanged pipeline runs against it with team settings from the environment."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from conftest import BIN, SMALL_PARAMS, copy_project, dvc, merge, project_env, run
from mlops_notebooks.tools.team import StackPorts, alive, free_port, load_stack, s3_client, start_stack, stop_stack

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

MODEL = "claims-cost"
# XGBoost, so that training runs on the Dask cluster (scikit-learn's booster trains in process).
TEAM_PARAMS = merge(SMALL_PARAMS, {"train": {"estimator": "xgboost", "max_iter": 40}})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    "A running team stack with fresh random credentials; stopped (every process by its pid) afterwards."
    credentials = {"MLFLOW_TRACKING_USERNAME": "team-admin",
                   "MLFLOW_TRACKING_PASSWORD": "pw-" + secrets.token_hex(12),
                   "AWS_ACCESS_KEY_ID": "team" + secrets.token_hex(6),
                   "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_hex(16)}
    state_dir = tmp_path_factory.mktemp("team") / "stack"
    started = time.monotonic()
    info = start_stack(state_dir, StackPorts.free(), environ=credentials)
    print(f"team stack up in {time.monotonic() - started:.1f} s")
    assert set(info.pids) == {"postgres", "seaweedfs", "mlflow", "dask-scheduler", "dask-worker-1", "dask-worker-2"}
    assert load_stack(state_dir).pids == info.pids
    yield info, credentials
    logs = {path.name: path.read_text(errors="replace") for path in Path(info.state_dir).glob("*.log")}
    stop_stack(state_dir)
    assert not any(alive(pid) for pid in info.pids.values()), "every stack process is stopped"
    assert not Path(info.state_dir).exists() and not Path(info.postgres_dir).exists()
    leaked = [name for name, text in logs.items() if any(secret in text for secret in _secrets(credentials))]
    assert not leaked, f"credentials in the stack's logs: {leaked}"


def _secrets(credentials: dict) -> list[str]:
    return [credentials["MLFLOW_TRACKING_PASSWORD"], credentials["AWS_SECRET_ACCESS_KEY"]]


def team_env(info, credentials) -> dict:
    "What a data scientist on the team has: the stack's settings and their credentials, in the environment."
    return {**credentials, **info.settings_environment()}


@pytest.fixture(scope="module")
def team_project(stack, tmp_path_factory):
    "A project copy on which `dvc repro` ran against the team stack."
    info, credentials = stack
    project = copy_project(tmp_path_factory.mktemp("team-project"), TEAM_PARAMS)
    dvc(project, "repro", env=team_env(info, credentials))
    return project


@contextlib.contextmanager
def tracking(uri: str):
    "MLflow's process-wide tracking and registry URIs set to `uri` (an earlier test may have set others), then restored."
    import mlflow
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def mlflow_client(info, credentials, monkeypatch):
    from mlflow import MlflowClient
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    return MlflowClient(tracking_uri=info.tracking_uri, registry_uri=info.tracking_uri)


def test_server_refuses_strangers(stack):
    info, credentials = stack
    search = info.tracking_uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    login = (credentials["MLFLOW_TRACKING_USERNAME"], credentials["MLFLOW_TRACKING_PASSWORD"])
    assert requests.get(search, timeout=10).status_code == 401, "no password"
    assert requests.get(search, auth=(login[0], "wrong"), timeout=10).status_code == 401, "a wrong password"
    assert requests.get(search, auth=login, headers={"Host": "mlflow.attacker.example"}, timeout=10).status_code == 403
    assert requests.get(search, auth=login, timeout=10).status_code == 200
    # SeaweedFS checks each request's signature: a wrong secret is refused, the right one lists the bucket.
    from botocore.exceptions import ClientError
    wrong = s3_client(info.s3_endpoint_url, {**credentials, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    with pytest.raises(ClientError) as refused:
        wrong.list_objects_v2(Bucket="mlops")
    assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied", "403"}
    assert s3_client(info.s3_endpoint_url, credentials).list_objects_v2(Bucket="mlops")["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_pipeline_on_the_team_stack(stack, team_project, monkeypatch):
    info, credentials = stack
    client = mlflow_client(info, credentials, monkeypatch)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1 and client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version
    run_ = client.get_run(versions[0].run_id)
    assert run_.data.params["train.estimator"] == "xgboost" and "lineage.git_commit" in run_.data.tags
    train_run = json.loads((team_project / "models/train_run.json").read_text())
    assert train_run["run_id"] == versions[0].run_id
    # The model's files went through the server into the S3 bucket, not into the project.
    objects = s3_client(info.s3_endpoint_url, credentials).list_objects_v2(Bucket="mlops", Prefix="mlflow/")
    assert any(item["Key"].endswith("MLmodel") for item in objects.get("Contents", []))
    assert not (team_project / "mlartifacts").exists() and not (team_project / "mlflow.db").exists()
    # Ingest, validate, features and training ran on the Dask cluster; the model is the usual Pipeline, XGBoost inside.
    assert "on the Dask cluster at tcp://127.0.0.1" in (team_project / "reports/01_ingest.ipynb").read_text()
    assert "on the Dask cluster" in (team_project / "reports/03_features.ipynb").read_text()
    from distributed import Client
    with Client(info.dask_scheduler, timeout=30) as dask_client:
        prefixes = dask_client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    for work in ["check_partition", "split_partition"]:  # validate's and features' work per partition
        assert any(work in prefix for prefix in prefixes), (work, prefixes)
    worker_logs = "".join((Path(info.state_dir) / f"dask-worker-{n}.log").read_text() for n in (1, 2))
    assert "[xgboost.dask-dask-worker-" in worker_logs and "got rank 0" in worker_logs, "XGBoost trained on a worker"
    import mlflow
    with tracking(info.tracking_uri):
        pipeline = mlflow.sklearn.load_model(f"models:/{MODEL}@champion")
    from mlops_notebooks.stages.train import final_estimator
    assert type(final_estimator(pipeline)).__name__ == "XGBRegressor"  # inside its balance correction (train.balance)
    # The cluster's outputs are the embedded default's: the same claims, the same checks, the same split.
    from mlops_notebooks.stages.features import FeaturesParams, split_claims, select_features
    from mlops_notebooks.stages.ingest import IngestParams, ingest_claims
    from mlops_notebooks.stages.schema import DataParams
    from mlops_notebooks.stages.validate import ValidateParams, check_claims
    import yaml
    params = yaml.safe_load((team_project / "params.yaml").read_text())
    declared = DataParams(**params["data"])
    raw = ingest_claims(declared, IngestParams(**params["ingest"]), team_project)
    assert pd.read_parquet(team_project / "data/raw/claims.parquet").equals(raw)
    clean, _ = check_claims(raw, declared, ValidateParams(**params["validate"]))
    assert pd.read_parquet(team_project / "data/interim/claims.parquet").equals(clean.reset_index(drop=True))
    expected_train, expected_test = split_claims(
        select_features(pd.read_parquet(team_project / "data/interim/claims.parquet"), declared), declared,
        FeaturesParams(**params["features"]))
    assert pd.read_parquet(team_project / "data/processed/test.parquet").equals(expected_test)
    assert pd.read_parquet(team_project / "data/processed/train.parquet").equals(expected_train)


def test_served_champion_predicts_as_loaded(stack, team_project, monkeypatch):
    info, credentials = stack
    import mlflow
    for key, value in team_env(info, credentials).items():
        monkeypatch.setenv(key, value)
    test = pd.read_parquet(team_project / "data/processed/test.parquet").head(20)
    with tracking(info.tracking_uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        champion_version = int(mlflow.MlflowClient().get_model_version_by_alias(MODEL, "champion").version)
    features = loaded.metadata.get_input_schema().input_names()
    expected = np.asarray(loaded.predict(test[features]), dtype=float)

    port = free_port()
    log_path = team_project / "service.log"
    with open(log_path, "w") as log:
        service = subprocess.Popen([str(BIN / "mlops-notebooks"), "serve", "--port", str(port)], cwd=team_project,
                                   env={**project_env(), **team_env(info, credentials)}, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert service.poll() is None, log_path.read_text()
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        records = json.loads(test[features].to_json(orient="records"))
        answer = requests.post(url + "/predict", json=records, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == champion_version
        np.testing.assert_allclose(answer.json()["predictions"], expected, rtol=1e-6)
    finally:
        service.terminate()
        service.wait(timeout=30)
    assert not any(secret in log_path.read_text() for secret in _secrets(credentials))


def test_dvc_remote_on_s3(stack, team_project):
    info, credentials = stack
    env = team_env(info, credentials)
    run([str(BIN / "mlops-notebooks"), "remote"], team_project, env=env)
    local_config = (team_project / ".dvc/config.local").read_text()
    assert "url = s3://mlops/dvc" in local_config and info.s3_endpoint_url in local_config
    assert not any(secret in local_config for secret in _secrets(credentials))
    dvc(team_project, "push", env=env)
    outputs = ["data/raw/claims.parquet", "data/processed/train.parquet", "data/processed/test.parquet"]
    before = {path: (team_project / path).read_bytes() for path in outputs}
    shutil.rmtree(team_project / ".dvc/cache")
    for path in outputs:
        (team_project / path).unlink()
    refused = dvc(team_project, "pull", check=False, env={**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert refused.returncode != 0 and not any((team_project / path).exists() for path in outputs)
    dvc(team_project, "pull", env=env)
    assert {path: (team_project / path).read_bytes() for path in outputs} == before


def test_no_credentials_anywhere(stack, team_project, monkeypatch):
    info, credentials = stack
    secrets_ = _secrets(credentials)
    leaks = []
    for path in team_project.rglob("*"):
        if path.is_file() and ".git" not in path.parts and "cache" not in path.parts:
            text = path.read_bytes()
            leaks += [str(path) for secret in secrets_ if secret.encode() in text]
    assert list((team_project / "reports").glob("*.ipynb")), "the executed notebooks are checked"
    assert not leaks, f"credentials written to: {sorted(set(leaks))}"
    client = mlflow_client(info, credentials, monkeypatch)
    for run_ in client.search_runs([client.get_experiment_by_name("claims-cost").experiment_id]):
        recorded = json.dumps([run_.data.params, run_.data.tags])
        assert not any(secret in recorded for secret in secrets_), run_.info.run_id


def test_stack_needs_credentials(tmp_path):
    from mlops_notebooks.core.settings import UserError
    with pytest.raises(UserError, match="AWS_SECRET_ACCESS_KEY not set"):
        start_stack(tmp_path / "stack", StackPorts.free(), environ={"MLFLOW_TRACKING_USERNAME": "a",
                                                                    "MLFLOW_TRACKING_PASSWORD": "b",
                                                                    "AWS_ACCESS_KEY_ID": "c"})
    assert not (tmp_path / "stack").exists(), "nothing started, nothing written"
