"""The lifecycle replay, as a user runs it: one command in a fresh copy of the project."""
import json
import sys

import pandas as pd
import pytest
from conftest import copy_project, run, set_params

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

# Small months, a short history and a cheap model: the replay's real code path in about a minute.
SMALL_REPLAY = {
    "train": {"max_iter": 30},
    "monitor": {"min_rows": 100},
    "replay": {"seed": 3, "claims_per_month": 1000, "history_months": 12, "start_month": "2024-01", "n_months": 7,
               "test_months": 1, "window_months": 12, "output": "reports/replay",
               "drift": {"start_month": "2024-03", "inflation_monthly": 0.02, "mix_shift": 0.5, "concept_shift": 1.5}},
}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("replay"))
    set_params(project, SMALL_REPLAY)
    result = run([sys.executable, "-m", "mlops_notebooks.tools.replay"], project)
    return project, result


def test_one_command_writes_the_timeline_plot_and_decisions(replayed):
    project, result = replayed
    output = project / "reports/replay"
    assert (output / "timeline.png").stat().st_size > 10_000
    timeline = pd.read_csv(output / "timeline.csv")
    assert timeline["month"].tolist() == [f"2024-0{month}" for month in range(1, 8)]
    summary = json.loads((output / "summary.json").read_text())
    assert json.loads(result.stdout.strip().splitlines()[-2]) == summary
    assert summary["promotions"] == (timeline["outcome"] == "promoted").sum() >= 1


def test_drift_is_flagged_at_onset_and_never_before(replayed):
    project, _ = replayed
    timeline = pd.read_csv(project / "reports/replay/timeline.csv")
    before, drifted = timeline[~timeline["drift_on"]], timeline[timeline["drift_on"]]
    assert (before["verdict"] == "stable").all() and not before["retrained"].any()
    assert drifted["verdict"].iloc[0] in ("drift", "miscalibrated", "degraded")  # any flag: FLAGGED


def test_the_loop_beats_never_retrained_on_every_drifted_month(replayed):
    project, _ = replayed
    timeline = pd.read_csv(project / "reports/replay/timeline.csv")
    drifted = timeline[timeline["drift_on"]].reset_index(drop=True)
    # While the first champion serves, both are the same model (equal errors); once a champion trained on drifted
    # claims serves, the loop is strictly better. A challenger is only trained once a flagged month can be in its
    # training data, so no champion re-fitted on undrifted months alone comes in between.
    first = drifted["champion_version"] == 1
    adapted = drifted["champion_trained_until"] >= "2024-03"
    assert adapted.any(), drifted
    assert (first | adapted).all(), drifted
    assert not drifted["retrained"].iloc[0], "the onset month is the gate's test month, not training data: no challenger yet"
    assert (drifted.loc[first, "error_loop"] == drifted.loc[first, "error_never"]).all()
    assert (drifted.loc[adapted, "error_loop"] < drifted.loc[adapted, "error_never"]).all(), drifted
    first_adapted = int(adapted.idxmax())
    assert first_adapted <= 2, "a champion trained on drifted claims serves from the second month after onset at most"


def test_every_promotion_has_its_decision_record(replayed):
    project, _ = replayed
    timeline = pd.read_csv(project / "reports/replay/timeline.csv")
    records = {path.stem: json.loads(path.read_text()) for path in (project / "reports/replay/decisions").glob("*.json")}
    assert records["2023-01"]["outcome"] == "promoted" and records["2023-01"]["champion"] is None  # the first champion
    for month in timeline.loc[timeline["outcome"] == "promoted", "month"]:
        record = records[month]
        assert record["outcome"] == "promoted" and record["flagged_months"]
        assert all(flagged <= record["trained_until"] for flagged in record["flagged_months"])
        assert record["challenger"]["metrics"]["mean_deviance"] < record["champion"]["metrics"]["mean_deviance"]
        assert {check["check"] for check in record["checks"]} >= {"finite_predictions", "beats_constant_baseline"}
    retrained = set(timeline.loc[timeline["retrained"], "month"])
    assert retrained == set(records) - {"2023-01"}


def test_the_replay_refuses_a_declared_file_clearly(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, {**SMALL_REPLAY, "data": {"source": "data/sources/claims.csv"}})
    result = run([sys.executable, "-m", "mlops_notebooks.tools.replay"], project, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ParamsError: params.yaml: the replay generates claims: it needs data.source: '' and data.period set")
    assert not (project / "reports/replay").exists()
