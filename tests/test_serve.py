"""The prediction service over real HTTP on 127.0.0.1: predictions, bad requests, the prediction log, hot swap,
restart, kill -9, batch scoring and audit by request id. The service runs as `mlops-notebooks serve` in a copy of
the session's pipeline project and is stopped by its pid."""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import BIN, dvc, project_env, run, set_params

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

MODEL = "claims-cost"
FEATURES = ["line_of_business", "claim_type", "region", "policyholder_age", "claimant_age", "vehicle_age",
            "sum_insured", "policy_tenure_years", "report_delay_days", "initial_reserve", "injury", "litigation"]
MAX_RECORDS = 50  # small, so "too many records" is cheap to send

# Runs in a subprocess (MLflow's global state stays out of pytest): train a different model on the project's
# training split, log it to a fresh experiment, register it, move `champion` to it, and save its predictions
# on the given records so the test can compare.
NEW_CHAMPION_SCRIPT = """
import json, sys
import mlflow, pandas as pd, yaml
from mlflow import MlflowClient
from mlops_notebooks.stages.schema import DataParams
from mlops_notebooks.stages.train import TrainParams, feature_frame, fit_model, log_training_run
from mlops_notebooks.core.settings import configure_mlflow, load_settings, project_root
from mlops_notebooks.serving.serve import Champion

root = project_root()
configure_mlflow(load_settings(root), root)
features = DataParams(**yaml.safe_load(open("params.yaml"))["data"])
train = pd.read_parquet("data/processed/train.parquet")
model = fit_model(train, features, TrainParams(max_iter=15, learning_rate=0.3, max_leaf_nodes=8))
logged = log_training_run(model, feature_frame(train, features), {}, {}, {"lineage.git_commit": "hot-swap-test"})
version = mlflow.register_model(logged["model_uri"], "claims-cost", tags={"lineage.git_commit": "hot-swap-test"})
records = json.load(open(sys.argv[1]))
expected = model.predict(pd.DataFrame(records)[feature_frame(train, features).columns]).tolist()
json.dump({"version": int(version.version), "predictions": expected}, open(sys.argv[2], "w"))
MlflowClient().set_registered_model_alias("claims-cost", "champion", version.version)
"""


# ---------------------------------------------------------------- running the service

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    "`mlops-notebooks serve` in a project, started as a subprocess and stopped by its pid."
    def __init__(self, project: Path, poll_seconds: float = 30.0, env: dict | None = None):
        self.project, self.port = project, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(project / f"service-{self.port}.log", "w")
        env = {**project_env(), "MLOPS_MODEL_POLL_SECONDS": str(poll_seconds),
               "MLOPS_MAX_RECORDS_PER_REQUEST": str(MAX_RECORDS), **(env or {})}
        self.process = subprocess.Popen([str(BIN / "mlops-notebooks"), "serve", "--port", str(self.port)],
                                        cwd=project, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited ({self.process.returncode}): {self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise AssertionError(f"the service did not answer within {timeout} s: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.project / f"service-{self.port}.log").read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        "Send `sig` to the service's pid; return its exit status once it has gone and its port is closed."
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self.log.close()
        with pytest.raises(requests.ConnectionError):
            requests.get(self.url + "/health", timeout=2)
        return code


def post(url: str, payload, session=None) -> requests.Response:
    return (session or requests).post(url + "/predict", data=json.dumps(payload),
                                      headers={"content-type": "application/json"}, timeout=30)


def sample_records(project: Path, n: int) -> list[dict]:
    "Real claims from the test split, as JSON records (missing values as null)."
    claims = pd.read_parquet(project / "data/processed/test.parquet")[FEATURES].head(n)
    return json.loads(claims.to_json(orient="records"))


def champion_predictions(project: Path, version: int, records: list[dict]) -> list[float]:
    "What the registered model version predicts for `records`, loaded with MLflow from its artifact."
    import mlflow
    from mlflow import MlflowClient
    store = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    logged = client.get_logged_model(client.get_model_version(MODEL, str(version)).source.removeprefix("models:/"))
    model = mlflow.sklearn.load_model(logged.artifact_location)
    return model.predict(pd.DataFrame(records)).tolist()


def prediction_log(project: Path) -> pd.DataFrame:
    from mlops_notebooks.core.predictions import read_prediction_log
    return read_prediction_log(project / "predictions.db")


@pytest.fixture(scope="module")
def project(repro_project, tmp_path_factory) -> Path:
    "A copy of the session's pipeline project (champion = version 1), so registering here changes nothing else."
    copy = tmp_path_factory.mktemp("serve") / "project"
    shutil.copytree(repro_project, copy, symlinks=True)
    (copy / "predictions.db").unlink(missing_ok=True)
    shutil.rmtree(copy / ".serving", ignore_errors=True)  # the module's first service is a first start
    return copy


@pytest.fixture(scope="module")
def service(project):
    running = Service(project)
    yield running
    assert running.stop() == 0, running.output()


# ---------------------------------------------------------------- happy path, log, audit

def test_answers_predictions_of_the_champion(service, project):
    # a first start: the champion came from the registry, through MLflow's client
    assert f"serving {MODEL} version 1 (the registry) on" in service.output()
    records = sample_records(project, 20)
    expected = champion_predictions(project, 1, records)
    with requests.Session() as session:  # keep-alive
        one = post(service.url, records[0], session)
        many = post(service.url, records, session)
    assert one.status_code == 200 and many.status_code == 200, (one.text, many.text)
    assert one.json()["model_version"] == many.json()["model_version"] == 1
    assert one.json()["model_name"] == MODEL
    assert np.allclose(one.json()["predictions"], expected[:1], rtol=1e-10)
    assert np.allclose(many.json()["predictions"], expected, rtol=1e-10)
    assert str(uuid.UUID(many.json()["request_id"])) == many.json()["request_id"] == many.headers["X-Request-ID"]
    assert one.json()["request_id"] != many.json()["request_id"]
    flags = [{**record, "injury": bool(record["injury"]), "litigation": bool(record["litigation"])} for record in records]
    as_the_source_writes_them = post(service.url, flags)  # true/false, as in the raw claims: read as 1/0
    assert as_the_source_writes_them.status_code == 200, as_the_source_writes_them.text
    assert np.allclose(as_the_source_writes_them.json()["predictions"], expected, rtol=1e-10)

    health = requests.get(service.url + "/health", timeout=5).json()
    assert (health["status"], health["model_name"], health["model_version"]) == ("ok", MODEL, 1)
    assert health["champion_watcher"] == "running" and health["poll_seconds"] > 0
    model = requests.get(service.url + "/model", timeout=5).json()
    tags = json.loads(run([str(BIN / "mlops-notebooks"), "audit", "1", "--json"], project).stdout)
    assert model["version"] == 1 and model["run_id"] == tags["run_id"]
    assert model["predictor"] in ("treelite", "compiled"), "the claims model is served by a checked copy of its trees"
    assert model["lineage"]["lineage.git_commit"] == tags["code"]["git_commit"]
    assert model["lineage"]["decision.outcome"] == "promoted"
    assert [column["name"] for column in model["inputs"]] == FEATURES
    region = next(column for column in model["inputs"] if column["name"] == "region")
    assert set(region["categories"]) == {"north", "south", "east", "west", "capital"}


def test_the_trees_are_compiled_in_the_background_when_there_is_a_compiler(service, project):
    from mlops_notebooks.serving.serve import c_compiler
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        predictor = requests.get(service.url + "/model", timeout=5).json()["predictor"]
        if predictor != "treelite":
            break
        time.sleep(0.5)
    if c_compiler() is None:  # the interpreter keeps serving, and the log says why
        assert predictor == "treelite" and "no C compiler" in service.output()
    else:
        assert predictor == "compiled", service.output()
        assert len(list((project / ".serving/compiled").glob("trees-*.so"))) == 1
    records = sample_records(project, MAX_RECORDS)  # (the multi-threaded path: nbs/serving/00_serve.ipynb's own checks)
    for batch in (records[:1], records):
        answer = post(service.url, batch).json()
        assert np.allclose(answer["predictions"], champion_predictions(project, 1, batch), rtol=1e-10)


def test_every_prediction_is_in_the_log_and_audit_traces_it(service, project):
    records = sample_records(project, 7)
    answer = post(service.url, records).json()
    request_id = answer["request_id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the writer thread commits within milliseconds
        logged = prediction_log(project)
        rows = logged[logged["request_id"] == request_id]
        if len(rows) == len(records):
            break
        time.sleep(0.1)
    assert rows["row"].tolist() == list(range(7))
    assert set(rows["model_version"]) == {1} and set(rows["model_name"]) == {MODEL}
    assert np.allclose(rows["prediction"], answer["predictions"], rtol=1e-10)
    sent = pd.DataFrame(records)
    for column in FEATURES:
        assert rows[column].reset_index(drop=True).equals(sent[column]), column
    assert (rows["logged_at"] > pd.Timestamp.now(tz="UTC") - pd.Timedelta(minutes=5)).all()

    audit = run([str(BIN / "mlops-notebooks"), "audit", request_id, "--json"], project)
    report = json.loads(audit.stdout)
    assert report["request"]["request_id"] == request_id and report["request"]["rows"] == 7
    assert report["request"]["model_version"] == report["version"] == 1
    assert np.allclose(report["request"]["predictions"], answer["predictions"])
    assert report["code"]["git_commit"] and report["data"]["data/processed/train.parquet"]
    text = run([str(BIN / "mlops-notebooks"), "audit", request_id], project).stdout
    assert text.startswith(f"request    {request_id} at ") and f"answered by {MODEL} version 1" in text
    unknown = run([str(BIN / "mlops-notebooks"), "audit", str(uuid.uuid4())], project, check=False)
    assert unknown.returncode == 2 and "no such request in the prediction log" in unknown.stderr


# ---------------------------------------------------------------- bad requests

def _bad_requests(good: dict) -> list[tuple]:
    "(what, body bytes, content-type, expected status, field the answer must name or None)."
    def body(payload):
        return json.dumps(payload).encode()
    without_region = {key: value for key, value in good.items() if key != "region"}
    return [
        ("malformed JSON", b'{"region": "north",', "application/json", 422, None),
        ("not JSON at all", b"hello", "application/json", 422, None),
        ("empty body", b"", "application/json", 422, None),
        ("text/plain content type", body(good), "text/plain", 415, None),
        ("no content type", body(good), None, 415, None),
        ("form-encoded body", b"region=north", "application/x-www-form-urlencoded", 415, None),
        ("a JSON number", b"42", "application/json", 422, None),
        ("a JSON string", b'"north"', "application/json", 422, None),
        ("an empty list", b"[]", "application/json", 422, None),
        ("a list of numbers", b"[1, 2]", "application/json", 422, None),
        ("a missing field", body(without_region), "application/json", 422, "region"),
        ("an unknown field", body({**good, "regoin": "north"}), "application/json", 422, "regoin"),
        ("null where a value is required", body({**good, "sum_insured": None}), "application/json", 422, "sum_insured"),
        ("a string for a number", body({**good, "policyholder_age": "40"}), "application/json", 422, "policyholder_age"),
        ("a boolean (read as 1) below a number's range", body({**good, "policyholder_age": True}), "application/json", 422,
         "policyholder_age"),
        ("a boolean and a string", body({**good, "injury": True, "litigation": "no"}), "application/json", 422, "litigation"),
        ("NaN", body(good).replace(b'"initial_reserve": ', b'"initial_reserve": NaN, "x": '), "application/json", 422, None),
        ("Infinity", b'{"sum_insured": Infinity}', "application/json", 422, None),
        ("a number overflowing to infinity", body({**good, "sum_insured": 1}).replace(b'"sum_insured": 1', b'"sum_insured": 1e400'),
         "application/json", 422, None),
        ("an integer of 400 digits", body({**good, "sum_insured": 1}).replace(b'"sum_insured": 1', b'"sum_insured": ' + b"9" * 400),
         "application/json", 422, None),
        ("an unknown category", body({**good, "region": "atlantis"}), "application/json", 422, "region"),
        ("a number for a category", body({**good, "claim_type": 3}), "application/json", 422, "claim_type"),
        ("an object as a value", body({**good, "vehicle_age": {"years": 3}}), "application/json", 422, "vehicle_age"),
        ("a list as a value", body({**good, "claimant_age": [30]}), "application/json", 422, "claimant_age"),
        ("a huge string", body({**good, "line_of_business": "m" * 100_000}), "application/json", 422, "line_of_business"),
        ("invalid UTF-8", b'{"region": "\xff\xfe"}', "application/json", 422, None),
        ("JSON nested 5000 deep", b"[" * 5000 + b"]" * 5000, "application/json", 422, None),
        ("one bad record among good ones", body([good, good, {**good, "injury": "yes"}]), "application/json", 422, "injury"),
        ("too many records", body([good] * (MAX_RECORDS + 1)), "application/json", 413, None),
    ]


def test_bad_requests_get_a_clear_4xx_and_are_not_logged(service, project):
    good = sample_records(project, 1)[0]
    before = len(prediction_log(project)) if (project / "predictions.db").exists() else 0
    cases = _bad_requests(good)
    assert len(cases) >= 20
    with requests.Session() as session:
        for what, body, content_type, status, field in cases:
            headers = {} if content_type is None else {"content-type": content_type}
            answer = session.post(service.url + "/predict", data=body, headers=headers, timeout=30)
            assert answer.status_code == status, (what, answer.status_code, answer.text[:300])
            problem = answer.json()
            assert problem["detail"], what
            if field is not None:
                named = {error["field"] for error in problem["errors"]}
                assert field in named and field in problem["detail"], (what, problem)
            if what == "one bad record among good ones":
                assert [error["record"] for error in problem["errors"]] == [2]
        assert session.get(service.url + "/predict", timeout=5).status_code == 405
        assert post(service.url, good, session).status_code == 200, "the service still answers"
    time.sleep(0.5)
    assert len(prediction_log(project)) == before + 1, "only the one good request is logged"


# ---------------------------------------------------------------- batch scoring

def test_batch_scoring_writes_predictions_with_the_model_version(service, project, tmp_path):
    claims = pd.read_parquet(project / "data/processed/test.parquet").head(300)
    claims.to_csv(tmp_path / "claims.csv", index=False)
    result = run([str(BIN / "mlops-notebooks"), "score", str(tmp_path / "claims.csv"), str(tmp_path / "scored.parquet")],
                 project)
    assert "scored 300 claims with claims-cost version 1" in result.stdout
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    assert len(scored) == 300 and set(scored["model_version"]) == {1} and set(scored["model_name"]) == {MODEL}
    assert scored["claim_id"].tolist() == claims["claim_id"].tolist(), "the input columns are kept, in order"
    expected = champion_predictions(project, 1, json.loads(claims[FEATURES].to_json(orient="records")))
    assert np.allclose(scored["prediction"], expected, rtol=1e-10)
    # the same answer as the service gives for those claims
    online = post(service.url, json.loads(claims[FEATURES].head(MAX_RECORDS).to_json(orient="records"))).json()
    assert np.allclose(online["predictions"], scored["prediction"].head(MAX_RECORDS), rtol=1e-10)

    claims.assign(region=np.where(claims.index % 100 == 7, "atlantis", claims["region"])).to_csv(tmp_path / "bad.csv", index=False)
    bad = run([str(BIN / "mlops-notebooks"), "score", str(tmp_path / "bad.csv"), str(tmp_path / "bad.parquet")],
              project, check=False)
    assert bad.returncode == 2 and "3 value(s) break the model's input contract: row 7 column 'region'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.parquet").exists()
    missing = run([str(BIN / "mlops-notebooks"), "score", str(tmp_path / "nowhere.csv"), str(tmp_path / "x.csv")],
                  project, check=False)
    assert missing.returncode == 2 and "nowhere.csv: file not found" in missing.stderr


def test_batch_scoring_takes_claims_as_ingest_takes_them(project, tmp_path):
    "The project's own source format (the generator's: booleans in injury/litigation, a month, the target) scores as "
    "the pipeline reads it: booleans as 0/1, the other columns kept as they came."
    from mlops_notebooks.stages.generator import generate_claims
    raw = generate_claims(200, "2024-01", 1, seed=5)
    assert raw["injury"].dtype == bool and raw["litigation"].dtype == bool
    raw.to_csv(tmp_path / "raw.csv", index=False)
    raw.to_parquet(tmp_path / "raw.parquet")
    as_trained = raw[FEATURES].astype({"injury": "float64", "litigation": "float64"})
    expected = champion_predictions(project, 1, json.loads(as_trained.to_json(orient="records")))
    for source in ("raw.csv", "raw.parquet"):
        result = run([str(BIN / "mlops-notebooks"), "score", str(tmp_path / source), str(tmp_path / f"{source}.scored.parquet")],
                     project, check=False)
        assert result.returncode == 0, (source, result.stderr)
        scored = pd.read_parquet(tmp_path / f"{source}.scored.parquet")
        assert np.allclose(scored["prediction"], expected, rtol=1e-10), source
        assert scored["injury"].dtype == bool and scored["claim_id"].tolist() == raw["claim_id"].tolist(), source


def test_inputs_outside_the_declared_ranges_are_refused_unless_switched_off(service, project, tmp_path):
    "params.yaml's validate.ranges hold at serve and score time (settings.ini check_input_ranges, on by default)."
    good = sample_records(project, 1)[0]
    answer = post(service.url, [good, {**good, "policyholder_age": -5}, {**good, "sum_insured": -1.5}])
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert "policyholder_age" in problem["detail"] and "-5" in problem["detail"] and "16 to 110" in problem["detail"]
    assert [(error["record"], error["field"], error["input"]) for error in problem["errors"]] == [
        (1, "policyholder_age", "-5"), (2, "sum_insured", "-1.5")]
    assert "at least 0" in problem["errors"][1]["problem"]
    assert post(service.url, {**good, "policyholder_age": 16}).status_code == 200, "the bounds are inclusive"

    claims = pd.read_parquet(project / "data/processed/test.parquet").head(50)
    claims.loc[3, "policyholder_age"] = -5
    claims.to_csv(tmp_path / "negative.csv", index=False)
    score = [str(BIN / "mlops-notebooks"), "score", str(tmp_path / "negative.csv"), str(tmp_path / "scored.csv")]
    refused = run(score, project, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    message = refused.stderr.strip()
    assert "negative.csv: 1 value(s) outside params.yaml's validate.ranges: row 3 column 'policyholder_age'" in message
    assert message.endswith("allowed 16 to 110 (got -5)"), message
    assert not (tmp_path / "scored.csv").exists()

    switched_off = {"MLOPS_CHECK_INPUT_RANGES": "false"}
    assert run(score, project, env=switched_off).returncode == 0 and len(pd.read_csv(tmp_path / "scored.csv")) == 50
    unchecked = Service(project, env=switched_off)
    try:
        assert post(unchecked.url, {**good, "policyholder_age": -5}).status_code == 200
    finally:
        assert unchecked.stop() == 0, unchecked.output()


# ---------------------------------------------------------------- hot swap, restart, kill -9

def test_hot_swap_under_load_then_restart(service, project, tmp_path):
    assert service.stop() == 0  # the module's service is replaced by one that polls the registry often
    swapping = Service(project, poll_seconds=0.3)
    records = sample_records(project, 5)
    answers, failures, stop = [], [], threading.Event()

    def fire():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answer = post(swapping.url, records, session)
                    if answer.status_code != 200:
                        failures.append((answer.status_code, answer.text[:200]))
                    else:
                        answers.append(answer.json())
                except requests.RequestException as error:
                    failures.append(repr(error))

    firing = [threading.Thread(target=fire) for _ in range(3)]
    for thread in firing:
        thread.start()
    time.sleep(1.0)
    (tmp_path / "records.json").write_text(json.dumps(records))
    run([str(BIN / "python"), "-c", NEW_CHAMPION_SCRIPT, str(tmp_path / "records.json"), str(tmp_path / "new.json")],
        project)
    new = json.loads((tmp_path / "new.json").read_text())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(a["model_version"] == new["version"] for a in answers[-5:]):
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for thread in firing:
        thread.join()

    assert not failures, failures[:5]
    versions = [answer["model_version"] for answer in answers]
    assert versions[0] == 1 and versions[-1] == new["version"] == 2, set(versions)
    first_new = versions.index(2)
    assert set(versions[first_new:]) == {2} or versions[first_new:].count(1) <= 3, \
        "after the swap only requests already in flight may still answer with version 1"
    old_predictions = champion_predictions(project, 1, records)
    assert not np.allclose(old_predictions, new["predictions"]), "the test needs two models that differ"
    for answer in answers:  # each answer made wholly by the version it names
        expected = old_predictions if answer["model_version"] == 1 else new["predictions"]
        assert np.allclose(answer["predictions"], expected, rtol=1e-10), answer["model_version"]
    assert swapping.stop() == 0
    assert re.search(r"version 1 \(run \w+\) -> 2 \(run \w+\)", swapping.output())

    logged = prediction_log(project)
    by_request = logged.groupby("request_id")["model_version"].agg(["min", "max", "size"])
    answered = {answer["request_id"]: answer["model_version"] for answer in answers}
    assert set(answered) <= set(by_request.index), "a clean stop writes every answered request to the log"
    assert (by_request["min"] == by_request["max"]).all()
    assert all(by_request.loc[request_id, "min"] == version for request_id, version in answered.items())

    restarted = Service(project)  # a restart serves the alias's version at once, and appends to the same log
    try:
        assert requests.get(restarted.url + "/health", timeout=5).json()["model_version"] == 2
        answer = post(restarted.url, records).json()
        assert answer["model_version"] == 2 and np.allclose(answer["predictions"], new["predictions"], rtol=1e-10)
    finally:
        assert restarted.stop() == 0
    after = prediction_log(project)
    assert len(after) == len(logged) + len(records) and answer["request_id"] in set(after["request_id"])


def test_a_restart_starts_from_the_snapshot_and_follows_an_alias_moved_while_stopped(project):
    "The service keeps its last champion on disk; a restart serves it at once and asks the registry straight away."
    from mlflow import MlflowClient
    store = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert (project / ".serving/champion.pkl").is_file(), "the previous services kept their champion"
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 2
    client.set_registered_model_alias(MODEL, "champion", "1")  # moved while no service runs
    try:
        restarted = Service(project, poll_seconds=30.0)  # the first registry check must not wait for a poll
        try:
            assert "version 2 (the last snapshot; asking the registry now)" in restarted.output()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and requests.get(restarted.url + "/health", timeout=5).json()["model_version"] != 1:
                time.sleep(0.1)
            model = requests.get(restarted.url + "/model", timeout=5).json()
            assert model["version"] == 1 and model["registry_confirmed"] is True, model
            records = sample_records(project, 3)
            answer = post(restarted.url, records).json()
            assert answer["model_version"] == 1
            assert np.allclose(answer["predictions"], champion_predictions(project, 1, records), rtol=1e-10)
        finally:
            assert restarted.stop() == 0
        assert re.search(r"version 2 \(run \w+\) -> 1 \(run \w+\)", restarted.output())
    finally:
        client.set_registered_model_alias(MODEL, "champion", "2")


def test_kill_9_loses_at_most_the_batch_in_flight(project):
    killed = Service(project)
    records = sample_records(project, 3)
    with requests.Session() as session:
        settled = [post(killed.url, records, session).json()["request_id"] for _ in range(30)]
    time.sleep(1.0)  # every answered request has been committed by now
    in_flight = []
    with requests.Session() as session:
        for _ in range(20):
            in_flight.append(post(killed.url, records, session).json()["request_id"])
        killed.process.send_signal(signal.SIGKILL)  # right after the last answer: its rows may still be queued
    assert killed.stop() == -signal.SIGKILL
    with sqlite3.connect(project / "predictions.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    logged = prediction_log(project)
    rows = logged.groupby("request_id").size()
    assert set(settled) <= set(rows.index), "requests committed before the kill are all there"
    assert (rows.loc[[r for r in settled + in_flight if r in rows.index]] == len(records)).all(), \
        "a request is logged whole or not at all"
    lost = [request_id for request_id in in_flight if request_id not in rows.index]
    assert lost == in_flight[len(in_flight) - len(lost):], "only the last requests, still queued, can be lost"
    assert len(lost) <= 5, lost


def test_without_a_champion_the_service_says_so_and_exits(project, tmp_path):
    empty_registry = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db", "MLOPS_SERVICE_PORT": str(free_port())}
    result = run([str(BIN / "mlops-notebooks"), "serve"], project, check=False, env=empty_registry)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: no 'champion' version of model 'claims-cost' in the "
                                                       "registry: run `make pipeline` first")
    assert "Traceback" not in result.stderr


def reset_registry(project: Path, max_iter: int) -> str:
    """The registry reset: the registered model deleted (its numbers start again at 1), the pipeline run with other
    params; return the run behind the new version 1."""
    from mlflow import MlflowClient
    store = f"sqlite:///{project}/mlflow.db"
    MlflowClient(tracking_uri=store, registry_uri=store).delete_registered_model(MODEL)
    set_params(project, {"train": {"max_iter": max_iter}})
    run(["git", "commit", "-qam", f"train.max_iter {max_iter}"], project)  # register promotes from a clean tree only
    dvc(project, "repro", "register")
    version = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_by_alias(MODEL, "champion")
    assert int(version.version) == 1, version
    return version.run_id


def test_a_reset_registry_is_served_by_a_running_and_a_restarted_service(repro_project, tmp_path_factory):
    "After a reset, version 1 is another model: the service follows the registry's run, not the version number."
    project = tmp_path_factory.mktemp("reset") / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    (project / "predictions.db").unlink(missing_ok=True)
    shutil.rmtree(project / ".serving", ignore_errors=True)
    records = sample_records(project, 5)
    running = Service(project, poll_seconds=0.5)
    try:
        first = requests.get(running.url + "/model", timeout=5).json()
        assert first["version"] == 1
        reset_run = reset_registry(project, max_iter=15)  # while the service runs
        assert reset_run != first["run_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and requests.get(running.url + "/model", timeout=5).json()["run_id"] != reset_run:
            time.sleep(0.2)
        answer = post(running.url, records).json()
        assert answer["model_version"] == 1
        assert np.allclose(answer["predictions"], champion_predictions(project, 1, records), rtol=1e-10)
        first_reset_predictions = answer["predictions"]
    finally:
        assert running.stop() == 0
    assert "(run " + reset_run + ")" in running.output()

    second_reset_run = reset_registry(project, max_iter=25)  # while no service runs: the snapshot holds reset_run
    restarted = Service(project, poll_seconds=30.0)  # the first registry check must not wait for a poll
    try:
        assert "version 1 (the last snapshot; asking the registry now)" in restarted.output()
        deadline = time.monotonic() + 60
        model = requests.get(restarted.url + "/model", timeout=5).json()
        while time.monotonic() < deadline and not model["registry_confirmed"]:
            time.sleep(0.2)
            model = requests.get(restarted.url + "/model", timeout=5).json()
        assert (model["version"], model["run_id"], model["registry_confirmed"]) == (1, second_reset_run, True), model
        answer = post(restarted.url, records).json()
        assert answer["model_version"] == 1
        assert np.allclose(answer["predictions"], champion_predictions(project, 1, records), rtol=1e-10)
        assert not np.allclose(answer["predictions"], first_reset_predictions), \
            "the snapshot's model (the first reset's) would answer otherwise"
    finally:
        assert restarted.stop() == 0
