"""Data as a user brings it: a motor third-party portfolio unlike the generator (tests/motor_tpl.py) — integer years
as the period, a vehicle sub-group with hundreds of levels, exposure in days, a cost that is the sum of two
columns, policies renewed under the same number and policy-years split over two rows, mostly zero costs, a cost
trend without feature drift — declared by one params file and run as it comes."""
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_project, dvc, run, write_params
from motor_tpl import PARAMS, motor_tpl

from mlops_notebooks.core.settings import DataError, parse_params
from mlops_notebooks.stages.evaluate import cost_metrics, error_by_group
from mlops_notebooks.stages.features import FeaturesParams, select_features, split_claims
from mlops_notebooks.stages.ingest import IngestParams, ingest_claims
from mlops_notebooks.stages.monitor import MonitorParams, monitor_batch, prepare_batch
from mlops_notebooks.stages.schema import DataParams, period_span
from mlops_notebooks.stages.train import TrainParams, feature_frame, fit_model, sample_weight
from mlops_notebooks.stages.validate import ValidateParams, check_claims, validation_summary

DECLARED = parse_params(DataParams, "data", PARAMS["data"])
CHECKS = parse_params(ValidateParams, "validate", PARAMS["validate"])
SPLIT = parse_params(FeaturesParams, "features", PARAMS["features"])
UNUSED = IngestParams(n_claims=1, start_month="2022-01", n_months=1)  # the generator's section: not used with a source


@pytest.fixture(scope="module")
def book() -> pd.DataFrame:
    return motor_tpl(policies=5000)


def ingest(book: pd.DataFrame, root: Path, declared: DataParams = DECLARED) -> pd.DataFrame:
    "What the ingest stage does with the extract saved as the CSV the params name."
    (root / "data/sources").mkdir(parents=True, exist_ok=True)
    book.to_csv(root / declared.source, index=False)
    return ingest_claims(declared, UNUSED, root)


@pytest.fixture(scope="module")
def validated(book, tmp_path_factory):
    raw = ingest(book, tmp_path_factory.mktemp("extract"))
    clean, quarantine = check_claims(raw, DECLARED, CHECKS, source=DECLARED.source)
    return raw, clean, quarantine


@pytest.fixture(scope="module")
def split(validated):
    return split_claims(select_features(validated[1], DECLARED), DECLARED, SPLIT)


def test_the_derived_columns_are_computed_at_ingest(book, validated):
    raw = validated[0]
    assert len(raw) == len(book) and raw.columns[: len(book.columns)].tolist() == book.columns.tolist()
    assert np.allclose(raw["claim_cost"], book["Indtppd"] + book["Indtpbi"])
    assert np.allclose(raw["exposure"], book["Exppdays"] / 365)
    assert raw["policy_year"].tolist() == [f"{policy}-{year}" for policy, year in zip(book["PolNum"], book["CalYear"])]
    assert (raw["claim_cost"] == 0).mean() > 0.7, "the cost is mostly zero"


def test_a_bad_derivation_names_the_key_and_the_column(book, tmp_path):
    typo = DECLARED.model_copy(update={"derived": {**DECLARED.derived, "claim_cost": DECLARED.derived["claim_cost"].model_copy(
        update={"sum": ["Indtppd", "Indtbpi"]})}})
    with pytest.raises(DataError, match=r"data/sources/motor_tpl.csv: data.derived.claim_cost: no column\(s\) 'Indtbpi' in the source"):
        ingest(book, tmp_path, typo)
    from mlops_notebooks.core.settings import ParamsError
    with pytest.raises(ParamsError, match="data.derived.claim_cost.expression: unknown key"):
        parse_params(DataParams, "data", {**PARAMS["data"], "derived": {"claim_cost": {"expression": "Indtppd + Indtpbi"}}})


def test_integer_years_are_read_as_years_everywhere(book, validated, split):
    raw, clean, quarantine = validated
    assert str(clean["CalYear"].dtype) == "period[Y-DEC]"
    summary = validation_summary(raw, clean, quarantine, DECLARED)
    assert (summary["periods"], summary["period_unit"]) == (["2022", "2023"], "year")
    train, test = split
    assert (period_span(train["CalYear"]), period_span(test["CalYear"])) == ("2022..2022", "2023..2023")
    table = error_by_group(test, DECLARED, np.full(len(test), 1000.0))
    assert table["group"].tolist() == ["2023"]
    assert "1970" not in json.dumps(summary)


def test_renewed_policies_under_one_number_are_not_taken_for_duplicates(validated):
    raw = validated[0]
    by_number = DECLARED.model_copy(update={"id": "PolNum", "derived": {
        name: how for name, how in DECLARED.derived.items() if name != "policy_year"}, "dropped": [*DECLARED.dropped, "policy_year"]})
    with pytest.raises(DataError) as refused:
        check_claims(raw[raw["Exppdays"] > 0], by_number, CHECKS.model_copy(update={"duplicate_ids": "quarantine"}), "motor_tpl.csv")
    assert "column 'PolNum'" in str(refused.value) and "duplicate ids" in str(refused.value)
    assert "hint: most repeated ids repeat in another CalYear" in str(refused.value)
    assert "data.derived: {row_id: {join: [PolNum, CalYear]}}" in str(refused.value)


def test_policy_years_split_over_two_rows_are_summed(book, validated):
    raw, clean, quarantine = validated
    assert clean["policy_year"].is_unique
    split_rows = book.duplicated(["PolNum", "CalYear"]) & (book["Exppdays"] > 0)
    reasons = quarantine["reason"].value_counts().to_dict()
    assert reasons.pop("policy_year: duplicate id, summed into its first row (claim_cost)") == split_rows.sum() > 0
    assert list(reasons) == ["exposure: greater_than(0)"], "the rows without exposure, and nothing else, are set aside"
    exposed = raw[raw["exposure"] > 0]
    assert np.isclose(clean["claim_cost"].sum(), exposed["claim_cost"].sum()), "no cost lost or counted twice"
    kept_first, set_aside = check_claims(raw, DECLARED, CHECKS.model_copy(update={"duplicate_ids": "keep_first"}))
    assert len(kept_first) == len(clean) and kept_first["claim_cost"].sum() < clean["claim_cost"].sum()


def test_hundreds_of_levels_train_with_either_booster(split):
    train, test = split
    assert train["SubGroup2"].nunique() > 255, "more levels than scikit-learn's booster takes"
    scores = {}
    for name, estimator, objective in [("hgb", "hist_gradient_boosting", "poisson"), ("xgb", "xgboost", "tweedie")]:
        data = DECLARED.model_copy(update={"objective": objective, "tweedie_power": 1.6})
        for pooling in ("pooled", "each level"):
            params = TrainParams(estimator=estimator, max_iter=60, learning_rate=0.05, max_leaf_nodes=15,
                                 l2_regularization=1.0, **({} if pooling == "pooled" else
                                                           {"min_category_rows": 1, "max_categories": 255}))
            model = fit_model(train, data, params)
            scores[name, pooling] = cost_metrics(test[data.model_target], model.predict(feature_frame(test, data)),
                                                 data.deviance_power, sample_weight(test, data))
    assert scores["hgb", "pooled"]["gini"] > 0.2, scores
    # XGBoost splits on every rare level when it may: pooling them is what keeps its model usable.
    assert scores["xgb", "each level"]["d2"] < -1, scores
    assert scores["xgb", "pooled"]["d2"] > -0.3 and scores["xgb", "pooled"]["gini"] > scores["xgb", "each level"]["gini"], scores


def test_target_encoding_and_refusal_name_what_they_do(split):
    train, test = split
    target = fit_model(train, DECLARED, TrainParams(max_iter=30, high_cardinality="target"))
    assert target.named_steps["encode"].named_transformers_["target"].feature_names_in_.tolist() == ["SubGroup2"]
    assert np.isfinite(target.predict(feature_frame(test, DECLARED))).all()
    with pytest.raises(DataError, match=r"column 'SubGroup2' \(data.categorical\): \d+ levels, more than train.max_categories=64"):
        fit_model(train, DECLARED, TrainParams(max_iter=30, high_cardinality="refuse"))


@pytest.fixture(scope="module")
def champion(split):
    return fit_model(split[0], DECLARED, TrainParams(max_iter=30))


def test_the_service_accepts_a_pooled_level_and_refuses_an_unseen_one(split, champion):
    from mlflow.models import infer_signature
    from pydantic import ValidationError

    from mlops_notebooks.serving.serve import make_champion
    inputs = feature_frame(split[0], DECLARED)
    served = make_champion("motor-tpl", 1, "r" * 32, champion, infer_signature(inputs, champion.predict(inputs)))
    encoder = champion.named_steps["encode"].named_transformers_["categorical"]
    pooled = encoder.infrequent_categories_[list(encoder.feature_names_in_).index("SubGroup2")]
    assert len(pooled) > 100, "most sub-groups share the other level"
    record = inputs.head(1).to_dict("records")[0]
    rare = [{**record, "SubGroup2": level} for level in pooled[:3]]
    assert served.validator.validate_python(rare) == rare
    assert served.fast is not None, "the fast encoding reproduces the pooled codes"
    assert np.allclose(served.predict(rare), champion.predict(pd.DataFrame(rare)), rtol=1e-10, atol=0)
    with pytest.raises(ValidationError, match="SubGroup2"):
        served.validator.validate_python([{**record, "SubGroup2": "Z99"}])


def _monitored(champion, split, batch: pd.DataFrame) -> dict:
    "The monitor's verdict on a raw batch of the extract, against the training year."
    train, test = split
    prepared, problems = prepare_batch(batch, DECLARED, "2023.csv")
    assert problems == []
    return monitor_batch(train, prepared, DECLARED, MonitorParams(min_rows=200), champion, test)


def test_the_monitor_derives_a_raw_batch_and_judges_its_costs(book, split, champion):
    second_year = book[(book["CalYear"] == 2023) & (book["Exppdays"] > 0)].drop_duplicates(["PolNum", "CalYear"])
    verdict = _monitored(champion, split, second_year)
    assert verdict["verdict"] != "invalid" and verdict["labelled"] and verdict["problems"] == [], verdict["problems"]
    assert verdict["decay"]["batch_metrics"]["mean_actual"] > 0


def test_the_monitor_names_a_bad_batch_instead_of_crashing(book, split, champion):
    month = book[(book["CalYear"] == 2023) & (book["Exppdays"] > 0)].head(600).reset_index(drop=True)
    unexposed = _monitored(champion, split, month.assign(Exppdays=np.where(month.index % 3 == 0, 0, month["Exppdays"])))
    assert unexposed["verdict"] == "invalid"
    assert unexposed["problems"] == ["column 'exposure' (data.weight): 200 of 600 rows zero, negative, empty or "
                                     "unreadable, e.g. 0.0 (first at row 0)"]
    costs = month.assign(Indtppd=month["Indtppd"].where(month.index != 7, np.nan))
    assert _monitored(champion, split, costs)["problems"] == [
        "column 'claim_cost' (data.target): 1 of 600 rows empty, unreadable or infinite, e.g. nan (first at row 7)"]
    infinite = month.assign(Indtpbi=month["Indtpbi"].where(month.index != 9, np.inf))
    assert _monitored(champion, split, infinite)["verdict"] == "invalid"
    unreadable = month.astype({"Age": object, "Value": object})
    unreadable.loc[[4, 5], "Age"] = "?"
    unreadable.loc[11, "Value"] = "77kW"
    judged = _monitored(champion, split, unreadable)
    assert judged["verdict"] != "invalid" and judged["problems"] == [
        "column 'Age' (data.numeric): 2 of 600 rows unreadable, scored as missing, e.g. '?' (first at row 4)",
        "column 'Value' (data.numeric): 1 of 600 rows unreadable, scored as missing, e.g. '77kW' (first at row 11)"]
    kilowatts = _monitored(champion, split, month.assign(Value=month["Value"].astype(str) + "kW"))
    assert kilowatts["verdict"] == "invalid" and kilowatts["problems"][0].startswith(
        "column 'Value' (data.numeric): no readable number, 600 of 600 rows unreadable")


# The whole pipeline on the extract: one params file, the CSV as it comes, `dvc repro` in a copy of the project.

@pytest.fixture(scope="module")
def own_project(tmp_path_factory):
    "A copy of the project whose params.yaml declares the extract (its data, validate and features sections whole)."
    project = copy_project(tmp_path_factory.mktemp("own"), params=None)
    default = yaml.safe_load((project / "params.yaml").read_text())
    write_params(project, {**default, **PARAMS, "train": {**default["train"], "max_iter": 60, "learning_rate": 0.05},
                           "monitor": {**default["monitor"], "min_rows": 200}})
    run(["git", "commit", "-qam", "the extract's params"], project)
    (project / "data/sources").mkdir(parents=True, exist_ok=True)
    motor_tpl(policies=8000).to_csv(project / PARAMS["data"]["source"], index=False)
    dvc(project, "repro")
    return project


@pytest.mark.slow
def test_one_params_file_runs_the_whole_pipeline_on_the_extract(own_project):
    summary = json.loads((own_project / "reports/validation.json").read_text())
    assert (summary["periods"], summary["period_unit"]) == (["2022", "2023"], "year")
    assert summary["duplicate_ids"]["rows_set_aside"] > 0
    assert set(summary["quarantine_reasons"]) == {"exposure: greater_than(0)",
                                                  "policy_year: duplicate id, summed into its first row (claim_cost)"}
    metrics = json.loads((own_project / "reports/metrics.json").read_text())
    # Tested on the second year, whose costs rose: the model ranks risks well and under-prices the year by the trend.
    assert metrics["gini"] > 0.25 and metrics["d2"] > -0.2, metrics
    assert 1.0 < metrics["mean_actual"] / metrics["mean_predicted"] < 1.6, metrics
    groups = pd.read_csv(own_project / "reports/plots/error_by_group.csv")
    assert groups["group"].astype(str).tolist() == ["2023"]
    uri = f"sqlite:///{own_project}/mlflow.db"  # both named: an earlier test may have set the process-wide registry URI
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = json.loads((own_project / "models/train_run.json").read_text())["run_id"]
    tags = client.get_run(run_id).data.tags
    assert tags["training_window"] == "2022..2022"
    assert (tags["lineage.derived.claim_cost"], tags["lineage.derived.exposure"], tags["lineage.derived.policy_year"]) == (
        "Indtppd + Indtpbi", "Exppdays / 365", "join(PolNum, CalYear)")
    assert tags["lineage.params.data.derived.exposure.from"] == "Exppdays"
    version = client.get_model_version("claims-cost", "1")
    assert version.tags["lineage.evaluation_window"] == "2023..2023"
    assert version.tags["lineage.derived.claim_cost"] == "Indtppd + Indtpbi"
    audit = run([str(Path(os.sys.executable).parent / "mlops-notebooks"), "audit", "models:/claims-cost/1"], own_project).stdout
    assert "derived.claim_cost = Indtppd + Indtpbi" in audit and "training_window = 2022..2022" in audit


@pytest.mark.slow
def test_make_retrain_judges_a_bad_batch_and_exits_cleanly(own_project, tmp_path):
    import shutil
    project = tmp_path / "project"
    shutil.copytree(own_project, project, symlinks=True)
    if not (project / ".venv").exists():  # `make` runs the project's own venv (a copy may have its link already)
        (project / ".venv").symlink_to(Path(os.sys.executable).parents[1])
    book = pd.read_csv(project / PARAMS["data"]["source"])
    month = book[(book["CalYear"] == 2023) & (book["Exppdays"] > 0)].head(600).assign(Exppdays=0)
    (project / "data/incoming").mkdir(exist_ok=True)
    month.to_csv(project / "data/incoming/2024-01.csv", index=False)
    done = run(["make", "retrain"], project, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no re-training after this verdict (invalid)" in done.stdout
    verdict = json.loads((project / "reports/monitor_verdict.json").read_text())
    assert verdict["verdict"] == "invalid" and verdict["sources"] == ["2024-01.csv"]
    assert verdict["problems"][0].startswith("column 'exposure' (data.weight): 600 of 600 rows zero")
