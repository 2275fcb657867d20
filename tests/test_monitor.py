"""The monitor: false alarms on stable months, drift onset, decay with labels, bad batches, and the stage in DVC."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import dvc, run, set_params

from mlops_notebooks.core.artifacts import file_md5
from mlops_notebooks.stages.features import select_features, split_by_month
from mlops_notebooks.stages.generator import CLAIMS_DATA, DriftKnobs, generate_claims
from mlops_notebooks.stages.monitor import MonitorParams, monitor_batch
from mlops_notebooks.stages.schema import DataParams
from mlops_notebooks.stages.train import TrainParams, fit_model

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

RULES = MonitorParams(min_rows=100)  # the thresholds of params.yaml, smaller batches allowed
PER_MONTH = 1000
ONSET = "2024-01"


def history(seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    "(training reference, evaluation split) of two undrifted years."
    claims = select_features(generate_claims(PER_MONTH * 24, "2022-01", 24, seed=seed), CLAIMS_DATA)
    return split_by_month(claims, 6)


def month(month: str, seed: int, drift: DriftKnobs | None = None, rows: int = PER_MONTH) -> pd.DataFrame:
    return generate_claims(rows, month, 1, seed=seed, drift=drift, first_claim_id=10**7)


@pytest.fixture(scope="module")
def champion():
    "A small champion trained on seed 0's history, with its evaluation split."
    train, test = history(0)
    return fit_model(train, CLAIMS_DATA, TrainParams(max_iter=30)), test


def test_false_alarm_rate_on_stable_months_is_at_most_5_percent_over_20_seeds(champion):
    model, evaluation = champion
    verdicts = []
    for seed in range(20):
        reference, _ = history(seed)
        for offset, name in enumerate(["2024-01", "2024-02", "2024-03"]):
            batch = month(name, seed=1000 * seed + offset)  # labelled: the decay check runs too
            verdicts.append(monitor_batch(reference, batch, CLAIMS_DATA, RULES, model, evaluation)["verdict"])
    assert set(verdicts) <= {"stable", "drift", "miscalibrated", "degraded"}
    false_alarms = sum(verdict != "stable" for verdict in verdicts) / len(verdicts)
    assert false_alarms <= 0.05, pd.Series(verdicts).value_counts()


def test_drift_onset_is_flagged_in_its_first_month(champion):
    model, evaluation = champion
    knobs = DriftKnobs(start_month=ONSET, inflation_monthly=0.02, mix_shift=0.5, concept_shift=1.0)
    for seed in range(5):
        reference, _ = history(seed)
        before = monitor_batch(reference, month("2023-12", 77 + seed, knobs), CLAIMS_DATA, RULES, model, evaluation)
        onset = monitor_batch(reference, month(ONSET, 77 + seed, knobs), CLAIMS_DATA, RULES, model, evaluation)
        assert before["verdict"] == "stable", before["drifted_features"]
        assert onset["verdict"] in ("drift", "miscalibrated", "degraded"), seed
        assert "line_of_business" in onset["drifted_features"], onset["drifted_features"]


def test_decay_is_detected_when_the_costs_are_known(champion):
    model, evaluation = champion
    reference, _ = history(0)
    # A change in how cost depends on the features: the features look the same, only the costs reveal it.
    batch = month(ONSET, 5, DriftKnobs(start_month=ONSET, concept_shift=2.0, inflation_monthly=0.05), rows=3000)
    labelled = monitor_batch(reference, batch, CLAIMS_DATA, RULES, model, evaluation)
    assert labelled["verdict"] == "degraded", labelled["decay"]
    assert labelled["decay"]["relative_change"] < -RULES.decay_tolerance
    assert labelled["decay"]["deviance_p_value"] < RULES.alpha
    unlabelled = monitor_batch(reference, batch.drop(columns="ultimate_cost"), CLAIMS_DATA, RULES, model, evaluation)
    assert not unlabelled["labelled"] and unlabelled["decay"] is None
    assert unlabelled["verdict"] == "stable", unlabelled["drifted_features"]


def test_a_cost_trend_with_no_feature_drift_is_flagged_by_actual_expected(champion):
    "Costs 20% higher and nothing else changed: the deviance hardly moves, actual / expected does."
    model, evaluation = champion
    for seed in range(3):
        reference, _ = history(seed)
        batch = month(ONSET, 300 + seed, rows=3000)
        as_it_is = monitor_batch(reference, batch, CLAIMS_DATA, RULES, model, evaluation)
        assert as_it_is["verdict"] == "stable", as_it_is["calibration"]["summary"]
        dearer = monitor_batch(reference, batch.assign(ultimate_cost=batch["ultimate_cost"] * 1.2), CLAIMS_DATA, RULES,
                               model, evaluation)
        assert dearer["verdict"] == "miscalibrated" and dearer["drifted_features"] == [], dearer["calibration"]["summary"]
        calibration = dearer["calibration"]
        assert calibration["ae"] == pytest.approx(1.2 * as_it_is["calibration"]["ae"])
        assert calibration["ci_low"] > 1 + RULES.ae_tolerance and calibration["p_value"] < RULES.alpha
        assert calibration["summary"].startswith("actual ") and "% above expected (A/E 1." in calibration["summary"]
        assert not dearer["decay"]["degraded"], "the deviance check alone would have said stable"


def test_the_verdict_file_holds_the_evidence_of_each_segment(champion):
    model, evaluation = champion
    reference, _ = history(2)
    batch = month(ONSET, 41, rows=3000)
    capital = batch["region"].eq("capital")
    batch["ultimate_cost"] = np.where(capital, batch["ultimate_cost"] * 1.6, batch["ultimate_cost"])
    verdict = monitor_batch(reference, batch, CLAIMS_DATA, RULES, model, evaluation)
    assert verdict["verdict"] == "miscalibrated" and verdict["calibration"]["drivers"][0].startswith("region=capital")
    segments = {(row["segment"], row["level"]): row for row in verdict["calibration"]["segments"]}
    assert segments[("region", "capital")]["flagged"] and segments[("region", "capital")]["p_adjusted"] < RULES.alpha
    assert not segments[("region", "north")]["flagged"]
    assert {level for segment, level in segments if segment == "prediction_decile"} == {f"d{d:02d}" for d in range(1, 11)}
    json.dumps(verdict)  # the record is written as JSON


# Zero-heavy claim counts with exposure (a claim frequency, as freMTPL2): a shape of data other than the generator's.
FREQUENCY = DataParams(id="policy", target="claims", weight="exposure", target_per_weight=True, objective="poisson",
                       categorical=["area", "vehicle"], numeric=["driver_age", "bonus"])


def policies(rows: int, seed: int, scale: float = 1.0, first_id: int = 0) -> pd.DataFrame:
    "Motor policies with their exposure (years) and claim counts, mostly zero; `scale` multiplies the frequency."
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"policy": np.arange(first_id, first_id + rows), "area": rng.choice(list("ABCDEF"), rows),
                          "vehicle": rng.choice(["B1", "B2", "B3", "B12"], rows),
                          "driver_age": rng.integers(18, 90, rows).astype(float),
                          "bonus": rng.choice([50.0, 60.0, 80.0, 100.0, 150.0], rows),
                          "exposure": rng.uniform(0.05, 1.0, rows)})
    frequency = 0.08 * np.exp(0.3 * frame["area"].isin(["E", "F"]) + 0.008 * (frame["bonus"] - 50)
                              + 0.4 * (frame["driver_age"] < 25))
    frame["claims"] = rng.poisson(scale * frequency * frame["exposure"])
    return frame


@pytest.fixture(scope="module")
def frequency_champion():
    training = select_features(policies(120_000, seed=1), FREQUENCY)
    evaluation = select_features(policies(20_000, seed=2, first_id=10**6), FREQUENCY)
    return fit_model(training, FREQUENCY, TrainParams(max_iter=40)), training, evaluation


def test_on_zero_heavy_claim_counts_a_higher_frequency_is_flagged_and_a_steady_one_is_not(frequency_champion):
    model, training, evaluation = frequency_champion
    for seed in range(3):
        steady = policies(60_000, seed=10 + seed, first_id=10**7)
        assert (steady["claims"] == 0).mean() > 0.9
        judged = monitor_batch(training, steady, FREQUENCY, RULES, model, evaluation)
        assert judged["verdict"] == "stable", judged["calibration"]["summary"]
        more = monitor_batch(training, policies(60_000, seed=10 + seed, scale=1.15, first_id=10**7), FREQUENCY, RULES,
                             model, evaluation)
        assert more["verdict"] == "miscalibrated", more["calibration"]["summary"]
        assert 1.05 < more["calibration"]["ae"] < 1.3 and more["calibration"]["actual"] == pytest.approx(
            policies(60_000, seed=10 + seed, scale=1.15)["claims"].sum())


def test_a_year_of_costs_15_percent_higher_is_flagged_and_a_random_half_of_the_training_year_is_not():
    "The issue's real-like case: two years, a cost trend and no feature drift; the model learned the first year."
    for seed in range(3):
        years = generate_claims(24_000, "2023-01", 24, seed=50 + seed)
        second = years["report_month"] >= "2024-01-01"
        years.loc[second, "ultimate_cost"] *= 1.15
        first_year = select_features(years[~second], CLAIMS_DATA)
        reference, evaluation = split_by_month(first_year, 2)
        model = fit_model(reference, CLAIMS_DATA, TrainParams(max_iter=60))
        trend = monitor_batch(reference, years[second], CLAIMS_DATA, RULES, model, evaluation)
        assert trend["verdict"] == "miscalibrated" and trend["drifted_features"] == [], trend["calibration"]["summary"]
        assert trend["calibration"]["ci_low"] > 1.05 and "above expected" in trend["calibration"]["summary"]
        half = years[~second].sample(frac=0.5, random_state=seed)
        assert monitor_batch(reference, half, CLAIMS_DATA, RULES, model, evaluation)["verdict"] == "stable"


def test_bonferroni_and_a_zero_effect_threshold_are_honoured(champion):
    reference, _ = history(1)
    knobs = DriftKnobs(start_month=ONSET, mix_shift=0.5)
    batch = month(ONSET, 9, knobs)
    strict = monitor_batch(reference, batch, CLAIMS_DATA, MonitorParams(min_rows=100, min_psi=10.0))
    assert strict["verdict"] == "stable", "a PSI threshold no shift reaches flags nothing"
    bonferroni = monitor_batch(reference, batch, CLAIMS_DATA, MonitorParams(min_rows=100, correction="bonferroni"))
    p_values = [row["p_value"] for row in bonferroni["evidence"].values()]
    assert [row["p_adjusted"] for row in bonferroni["evidence"].values()] == [min(1.0, p * len(p_values)) for p in p_values]
    assert bonferroni["verdict"] == "drift"


# The stage, in a copy of the pipeline that has run once (no champion change, no new training).

@pytest.fixture
def monitored(repro_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    set_params(project, {"monitor": {"min_rows": 100}})
    run(["git", "commit", "-qam", "monitor.min_rows 100"], project)  # a clean tree: a re-trained model may be promoted
    return project


def _incoming_batch(project, knobs=None, rows=600, start="2024-01"):
    "A month after the small params' training data (2023-01 .. 2023-12), with the claims table's columns."
    later = int(start[-2:]) - 1  # months after 2024-01: their own seed, and claim ids unique across months
    return generate_claims(rows, start, 1, seed=11 + later, drift=knobs, first_claim_id=10**7 + later * 10**5)


def _run_monitor(project) -> dict:
    dvc(project, "repro", "--single-item", "monitor")  # judge the batch with the current champion, train nothing
    return json.loads((project / "reports/monitor_verdict.json").read_text())


def test_the_stage_without_incoming_batches_says_so(repro_project):
    verdict = json.loads((repro_project / "reports/monitor_verdict.json").read_text())
    assert verdict["verdict"] == "no_data" and verdict["retrain"] is False
    assert "no batch files" in verdict["problems"][0]


def test_bad_batches_get_a_clear_verdict_and_leave_the_reference_alone(monitored):
    reference = monitored / "data/processed/train.parquet"
    before = file_md5(reference)
    incoming = monitored / "data/incoming"

    (incoming / "empty.csv").write_text("")
    verdict = _run_monitor(monitored)
    assert verdict["verdict"] == "invalid" and "empty.csv: the file is empty" in verdict["problems"][0]
    (incoming / "empty.csv").unlink()

    _incoming_batch(monitored).drop(columns=["claimant_age"]).to_csv(incoming / "2024-01.csv", index=False)
    verdict = _run_monitor(monitored)
    assert verdict["verdict"] == "invalid"
    assert verdict["problems"] == ["column 'claimant_age' (data.numeric): missing"]
    assert verdict["retrain"] is False

    batch = _incoming_batch(monitored)
    batch.loc[::4, "region"] = "atlantis"
    batch.drop(columns="ultimate_cost").to_csv(incoming / "2024-01.csv", index=False)
    verdict = _run_monitor(monitored)
    assert verdict["verdict"] == "drift" and "region" in verdict["drifted_features"]
    assert verdict["evidence"]["region"]["unseen_categories"] == ["atlantis"]
    assert verdict["champion_version"] == 1 and verdict["retrain"] is True
    assert file_md5(reference) == before


def test_a_labelled_drifted_batch_is_flagged_and_enters_the_training_window(monitored):
    knobs = DriftKnobs(start_month="2024-01", inflation_monthly=0.05, mix_shift=0.6, concept_shift=2.0)
    incoming = monitored / "data/incoming"
    _incoming_batch(monitored, knobs, rows=900).to_parquet(incoming / "2024-01.parquet")
    verdict = _run_monitor(monitored)
    assert verdict["verdict"] in ("drift", "miscalibrated", "degraded") and verdict["labelled"]
    assert verdict["decay"]["relative_change"] < 0
    # The small params hold out 3 test months: a challenger re-trained now would be gated on 2024-01, not trained on it.
    assert verdict["retrain"] is False and verdict["learnable_months"] == []
    assert "2024-01" in verdict["retrain_deferred"] and "test_months=3" in verdict["retrain_deferred"]
    for month in ("2024-02", "2024-03", "2024-04"):  # three more months arrive: 2024-01 moves out of the test months
        _incoming_batch(monitored, knobs, rows=900, start=month).to_parquet(incoming / f"{month}.parquet")
    verdict = _run_monitor(monitored)
    assert verdict["verdict"] in ("drift", "miscalibrated", "degraded") and verdict["retrain"] is True
    assert verdict["learnable_months"] == ["2024-01"] and "retrain_deferred" not in verdict
    # What `make retrain` does next: dvc re-runs from ingest (its incoming dependency changed) through the gate.
    status = dvc(monitored, "status", "--with-deps", "register").stdout
    assert "ingest" in status
    dvc(monitored, "repro", "register")
    claims = pd.read_parquet(monitored / "data/raw/claims.parquet")
    january = pd.Period("2024-01", freq="M")
    assert (claims["report_month"] == january).sum() == 900
    train, test = (pd.read_parquet(monitored / f"data/processed/{part}.parquet") for part in ("train", "test"))
    assert (train["report_month"] == january).sum() == 900, "the flagged month is training data"
    assert (str(test["report_month"].min()), str(test["report_month"].max())) == ("2024-02", "2024-04")
    decision = json.loads((monitored / "reports/register_decision.json").read_text())
    assert decision["challenger"]["version"] == 2 and decision["champion"]["version"] == 1
    assert decision["outcome"] in ("promoted", "kept_champion")
    assert yaml.safe_load((monitored / "params.yaml").read_text())["monitor"]["retrain"] == "on_drift"
