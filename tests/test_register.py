"""The registry gate on a real MLflow store (SQLite): promotion, rejection, idempotency, audit, concurrency."""
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, copy_project, dvc, run, set_params
from mlflow import MlflowClient
from mlops_notebooks.core.tracking import decision_history, read_decision
from mlops_notebooks.stages.evaluate import cost_metrics
from mlops_notebooks.stages.features import row_uniform
from mlops_notebooks.stages.generator import generate_claims

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

MODEL = "claims-cost"
# With the small test params: fewer boosting rounds is clearly worse; smaller trees, a smaller learning rate and
# more rounds is better (measured on the test split: mean gamma deviance 0.779 -> 0.763, Gini and MAE better too).
WORSE = {"train": {"max_iter": 5}}
BETTER = {"train": {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 6, "min_samples_leaf": 100}}
# A Poisson booster with a huge learning rate on heavy-tailed costs: predictions around 1e78 here.
DIVERGED = {"data": {"objective": "poisson"}, "train": {"learning_rate": 3.0}}


def client_for(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")


def decision(project: Path) -> dict:
    return json.loads((project / "reports/register_decision.json").read_text())


def registry_state(project: Path) -> dict:
    client = client_for(project)
    versions = client.search_model_versions(f"name='{MODEL}'")
    model = client.get_registered_model(MODEL)
    return {"versions": sorted(int(v.version) for v in versions),
            "aliases": {alias: str(version) for alias, version in model.aliases.items()}}


def audit(project: Path, target: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "mlops-notebooks"), "audit", target, *flags], project, check=False, env=env)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    "One project through first model, re-run, worse, better and diverged challengers; the decisions on the way."
    project = copy_project(tmp_path_factory.mktemp("registry"))
    original = (project / "params.yaml").read_text()
    steps = {}
    dvc(project, "repro")
    steps["first"] = (decision(project), registry_state(project))
    dvc(project, "repro", "--force", "--single-item", "register")
    steps["again"] = (decision(project), registry_state(project))
    for name, override in [("worse", WORSE), ("better", BETTER), ("diverged", DIVERGED)]:
        set_params(project, override)
        run(["git", "commit", "-qam", f"{name} params"], project)  # a clean tree: the gate may promote
        dvc(project, "repro")
        steps[name] = (decision(project), registry_state(project))
        (project / "params.yaml").write_text(original)  # every section back (the diverged step changed data too)
        run(["git", "commit", "-qam", "back"], project)
    # Uncommitted: the champion's own params again, a fresh run (no run cache) and a gate it passes by a 0% margin.
    set_params(project, {**BETTER, "register": {"min_relative_improvement": 0.0}})
    dvc(project, "repro", "--no-run-cache")
    steps["dirty"] = (decision(project), registry_state(project))
    return project, steps


def test_the_first_model_is_promoted_after_sanity_checks(lifecycle):
    project, steps = lifecycle
    record, state = steps["first"]
    assert record["outcome"] == "promoted" and record["champion"] is None
    assert [check["check"] for check in record["checks"]] == ["finite_predictions", "plausible_range",
                                                             "beats_constant_baseline", "calibration"]
    assert state == {"versions": [1], "aliases": {"champion": "1", "challenger": "1"}}
    # The constant baseline is what a constant model would have learned (the training mean), not the test rows' mean.
    training_mean = client_for(project).get_run(record["challenger"]["run_id"]).data.metrics["train_mean_target"]
    baseline = record["checks"][2]["detail"]
    assert baseline.endswith(f"for the training mean {training_mean:.6g}") and record["rule"]["baseline"] == "the training mean"
    assert f"{record['challenger']['metrics']['mean_actual']:.6g}" not in baseline
    calibration = record["checks"][3]
    assert calibration["passed"] and calibration["detail"].startswith(f"A/E {record['challenger']['metrics']['ae']:.4f}")


def test_re_running_register_creates_no_duplicate(lifecycle):
    _, steps = lifecycle
    record, state = steps["again"]
    assert record["outcome"] == "already_champion" and record["created_version"] is False
    assert state["versions"] == [1]


def test_a_worse_challenger_is_kept_out(lifecycle):
    _, steps = lifecycle
    record, state = steps["worse"]
    assert record["outcome"] == "kept_champion"
    assert record["champion"]["version"] == 1 and record["challenger"]["version"] == 2
    primary = next(check for check in record["checks"] if check["check"].startswith("mean_deviance improves"))
    assert primary["passed"] is False
    assert state["aliases"] == {"champion": "1", "challenger": "2"}


def test_a_better_challenger_is_promoted(lifecycle):
    _, steps = lifecycle
    record, state = steps["better"]
    assert record["outcome"] == "promoted", record["checks"]
    champion, challenger = record["champion"]["metrics"], record["challenger"]["metrics"]
    assert challenger["mean_deviance"] < 0.99 * champion["mean_deviance"]
    assert state["aliases"] == {"champion": "3", "challenger": "3"}


def test_a_diverged_model_is_never_promoted(lifecycle):
    _, steps = lifecycle
    record, state = steps["diverged"]
    assert record["outcome"] == "rejected"
    failed = {check["check"] for check in record["checks"] if not check["passed"]}
    assert {"plausible_range", "beats_constant_baseline"} <= failed
    assert state["aliases"] == {"champion": "3", "challenger": "4"}


def test_a_challenger_from_a_dirty_tree_does_not_move_the_champion(lifecycle):
    _, steps = lifecycle
    record, state = steps["dirty"]
    assert record["outcome"] == "passed_not_promoted", record["checks"]
    assert record["provenance"]["kind"] == "dirty" and "uncommitted changes" in record["provenance"]["reason"]
    assert state["aliases"] == {"champion": "3", "challenger": "5"}


def test_every_version_carries_lineage_and_its_decision(lifecycle):
    project, _ = lifecycle
    client = client_for(project)
    lock_hashes = {out["path"]: out["md5"] for stage in yaml.safe_load((project / "dvc.lock").read_text())["stages"].values()
                   for out in stage.get("outs", [])}
    commits = set(subprocess.run(["git", "rev-list", "HEAD"], cwd=project, capture_output=True, text=True).stdout.split())
    for version in client.search_model_versions(f"name='{MODEL}'"):
        tags = version.tags
        assert tags["lineage.git_commit"] in commits
        assert tags["lineage.run_id"] == version.run_id
        assert {"lineage.training_window", "lineage.train_rows", "lineage.evaluation_rows", "lineage.reports",
                "lineage.params.train.learning_rate", "decision.outcome", "decision.reason", "decision.artifact"} <= set(tags)
        assert "decision.record" not in tags, "the full record is a JSON artifact of the run, not a tag"
        assert read_decision(tags, client)["challenger"]["version"] == int(version.version)
    diverged, newest = client.get_model_version(MODEL, "4"), client.get_model_version(MODEL, "5")
    assert diverged.tags["lineage.git_dirty"] == "false" and diverged.tags["lineage.params.data.objective"] == "poisson"
    assert newest.tags["lineage.git_dirty"] == "true", "params.yaml was edited and not committed"
    assert newest.tags["lineage.data.data/processed/test.parquet"] == lock_hashes["data/processed/test.parquet"]


def test_audit_matches_the_registry(lifecycle):
    project, _ = lifecycle
    client = client_for(project)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    result = audit(project, f"models:/{MODEL}@champion", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["version"] == int(champion.version) == 3
    assert report["run_id"] == champion.run_id
    assert report["code"]["git_commit"] == champion.tags["lineage.git_commit"]
    assert report["data"]["data/processed/train.parquet"] == champion.tags["lineage.data.data/processed/train.parquet"]
    assert report["params"]["train.max_leaf_nodes"] == "6"
    assert report["decision"]["outcome"] == "promoted" and report["decision"]["champion"]["version"] == 1
    assert report["metrics"]["test_d2"] == client.get_run(champion.run_id).data.metrics["test_d2"]
    # the same model by version number and by run id; text output for people
    assert json.loads(audit(project, "3", "--json").stdout) == report
    assert json.loads(audit(project, champion.run_id, "--json").stdout)["version"] == 3
    text = audit(project, f"models:/{MODEL}/2").stdout
    assert text.splitlines()[0] == f"{MODEL} version 2  [challenger]" or text.splitlines()[0] == f"{MODEL} version 2"
    assert "decision 1 of 1   kept_champion" in text and "FAIL  mean_deviance improves" in text


def test_re_running_register_appends_to_the_decision_history(lifecycle):
    "The audit trail is append-only: a second decision on version 1 keeps the promotion that made it champion."
    project, _ = lifecycle
    client = client_for(project)
    tags = client.get_model_version(MODEL, "1").tags
    history = decision_history(tags, client)
    assert [entry["record"]["outcome"] for entry in history] == ["promoted", "already_champion"]
    assert tags["decision.count"] == "2" and tags["decision.1.outcome"] == "promoted"
    assert tags["decision.promotion"] == history[0]["artifact"] != history[1]["artifact"]
    assert tags["decision.outcome"] == "already_champion", "the latest decision's summary"
    report = json.loads(audit(project, f"models:/{MODEL}/1", "--json").stdout)
    assert report["promotion"] == 1 and [entry["number"] for entry in report["decisions"]] == [1, 2]
    text = audit(project, f"models:/{MODEL}/1").stdout
    assert "decision 1 of 2   promoted" in text and "(made it the champion)" in text
    assert "decision 2 of 2   already_champion" in text


def test_audit_refuses_what_it_cannot_find(lifecycle):
    project, _ = lifecycle
    for target, expected in [("models:/claims-cost/99", "not found in the registry"),
                             ("models:/claims-cost@retired", "not found in the registry"),
                             ("yesterday's model", "expected models:/<name>@<alias>")]:
        result = audit(project, target)
        assert result.returncode == 2 and result.stderr.startswith("error: audit ") and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_bad_rule_missing_champion_artifact_and_unreachable_store_leave_the_registry_as_it_was(lifecycle):
    project, _ = lifecycle
    before = registry_state(project)
    set_params(project, {"train": {"max_iter": 41}})  # a new challenger the gate would otherwise register
    dvc(project, "repro", "evaluate")

    set_params(project, {"register": {"primary_metric": "accuracy"}})
    output = dvc(project, "repro", "register", check=False)
    assert output.returncode != 0 and "register.primary_metric: unknown metric 'accuracy'" in output.stdout + output.stderr
    assert registry_state(project) == before
    set_params(project, {"register": {"primary_metric": "mean_deviance"}})

    champion = client_for(project).get_model_version_by_alias(MODEL, "champion")
    logged = client_for(project).get_logged_model(champion.source.removeprefix("models:/"))
    artifact_dir = Path(logged.artifact_location.replace("file://", ""))
    hidden = artifact_dir.with_name(artifact_dir.name + ".hidden")
    artifact_dir.rename(hidden)
    try:
        output = dvc(project, "repro", "register", check=False)
        assert output.returncode != 0
        assert f"DataError: {MODEL} version 3: cannot load its model artifact" in output.stdout + output.stderr
        assert registry_state(project) == before
    finally:
        hidden.rename(artifact_dir)

    unreachable = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    output = dvc(project, "repro", "register", check=False, env=unreachable)
    assert output.returncode != 0 and "http://127.0.0.1:9 is unreachable" in output.stdout + output.stderr
    assert registry_state(project) == before
    assert audit(project, "3", env=unreachable).stderr.startswith("error: settings.ini tracking_uri:")


def test_two_register_runs_at_once_end_with_one_champion(tmp_path):
    "Two projects share one registry; both register at the same moment; the better model ends as champion."
    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/shared.db"}
    ordinary = copy_project(tmp_path / "ordinary")
    better = copy_project(tmp_path / "better")
    set_params(better, BETTER)
    run(["git", "commit", "-qam", "better params"], better)  # a clean tree: its gate may promote
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda project: dvc(project, "repro", "evaluate", env=shared), [ordinary, better]))
        results = list(pool.map(lambda project: dvc(project, "repro", "register", check=False, env=shared),
                                [ordinary, better]))
    assert all(result.returncode == 0 for result in results), [result.stdout + result.stderr for result in results]
    client = MlflowClient(tracking_uri=shared["MLFLOW_TRACKING_URI"], registry_uri=shared["MLFLOW_TRACKING_URI"])
    versions = {version.version: version for version in client.search_model_versions(f"name='{MODEL}'")}
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert len(versions) == 2 and champion.version in versions
    better_run = json.loads((better / "models/train_run.json").read_text())["run_id"]
    assert champion.run_id == better_run, "whichever registered first, the better model must end as champion"
    outcomes = sorted([decision(ordinary)["outcome"], decision(better)["outcome"]])
    assert outcomes in (["kept_champion", "promoted"], ["promoted", "promoted"])


def months_of_claims(project: Path, months: list[str], scale: float = 1.0, rows: int = 700):
    "Labelled months after the small params' training year, in data/incoming/ (ingest appends them)."
    for offset, month in enumerate(months):
        batch = generate_claims(rows, month, 1, seed=70 + offset, first_claim_id=10**7 + offset * 10**5)
        batch.assign(ultimate_cost=batch["ultimate_cost"] * scale).to_csv(project / "data/incoming" / f"{month}.csv",
                                                                         index=False)


def test_a_challenger_whose_actual_expected_is_off_is_never_promoted(tmp_path):
    "Three newer months whose costs rose 30%, nothing else changed: they are the gate's test months."
    project = copy_project(tmp_path / "project")
    months_of_claims(project, ["2024-01", "2024-02", "2024-03"], scale=1.3)
    dvc(project, "repro")
    record = decision(project)
    assert record["outcome"] == "rejected" and record["champion"] is None
    assert [check["check"] for check in record["checks"] if not check["passed"]] == ["calibration"]
    calibration = record["checks"][3]
    assert calibration["detail"].startswith("A/E 1.") and "allowed [0.95, 1.05]" in calibration["detail"]
    assert 1.15 < record["challenger"]["metrics"]["ae"] < 1.5 and record["rule"]["ae_tolerance"] == 0.05
    assert registry_state(project)["aliases"] == {"challenger": "1"}, "no champion"


def ids(project: Path, part: str) -> set:
    return set(pd.read_parquet(project / f"data/processed/{part}.parquet", columns=["claim_id"])["claim_id"])


def test_the_gate_compares_the_champion_only_on_rows_it_did_not_learn_from(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, {"features": {"split": "random", "test_share": 0.2}})
    run(["git", "commit", "-qam", "a random split"], project)  # a clean tree: the gate may promote
    dvc(project, "repro")
    first_train, first_test = ids(project, "train"), ids(project, "test")
    assert decision(project)["outcome"] == "promoted"

    # A labelled batch arrives: the claims are split again, and no earlier row changes side.
    months_of_claims(project, ["2024-01"], rows=2000)
    dvc(project, "repro")
    assert first_train <= ids(project, "train") and first_test <= ids(project, "test")
    comparison = decision(project)["champion"]["comparison"]
    assert comparison["champion_trained_on"] == 0 and comparison["rows"] == len(ids(project, "test"))

    # The test share grows: rows the champion learned from are test rows now, and the gate leaves them out.
    set_params(project, {"features": {"test_share": 0.4}})
    dvc(project, "repro")
    record = decision(project)
    test = pd.read_parquet(project / "data/processed/test.parquet")
    learned = row_uniform(test["claim_id"], 0) >= 0.2  # the champion's split: seed 0, test share 0.2
    assert record["champion"]["comparison"]["champion_trained_on"] == learned.sum() > 0
    assert record["champion"]["comparison"]["rows"] == (~learned).sum()
    check = next(check for check in record["checks"] if check["check"].startswith("compared on"))
    assert check["passed"] and f"{learned.sum()} the champion learned from left out" in check["detail"]
    client = client_for(project)
    champion = client.get_model_version(MODEL, str(record["champion"]["version"]))
    import mlflow
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    try:
        champion_model = mlflow.sklearn.load_model(f"models:/{MODEL}/{champion.version}")
        # for the last step below: a champion registered by hand, with no record of its training rows
        by_hand = mlflow.register_model(champion.source, MODEL)
    finally:
        mlflow.set_tracking_uri(previous)
    unseen = test[~learned]
    features = list(champion_model.feature_names_in_)
    scored = cost_metrics(unseen["ultimate_cost"].to_numpy(), champion_model.predict(unseen[features]), "gamma")
    assert record["champion"]["metrics"]["mean_deviance"] == pytest.approx(scored["mean_deviance"])

    # A champion registered by hand, with no record of its training rows: the gate says so and keeps it.
    client.set_registered_model_alias(MODEL, "champion", by_hand.version)
    set_params(project, {"train": {"max_iter": 41}})
    dvc(project, "repro")
    record = decision(project)
    assert record["outcome"] == "kept_champion" and record["champion"]["version"] == int(by_hand.version)
    failed = {check["check"]: check["detail"] for check in record["checks"] if not check["passed"]}
    comparison = "compared on >= 100 rows neither model learned from"
    # calibration may fail too: uncompared, the challenger's A/E is judged against the tolerance alone
    assert comparison in failed and set(failed) <= {comparison, "calibration"}, failed
    assert "cannot tell which rows the champion learned from" in failed[comparison]
    assert record["champion"]["metrics"] == {}
    assert registry_state(project)["aliases"]["champion"] == str(by_hand.version)
