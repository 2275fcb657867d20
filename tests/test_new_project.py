"""A new project from the template (docs/new-project.md): made by `mlops-notebooks new` (copier), its own venv from
its lock (the platform as a wheel), `make pipeline` and `make test` in it, the champion audited; one from a table
of another shape, with its params inferred; an update from an earlier template commit that keeps the user's edits;
bad answers refused in one line with nothing left behind."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, run


def make_project(dest, *args, template=None):
    "`mlops-notebooks new DEST ...` from this working tree (or `template`)."
    extra = ["--template", str(template)] if template else []
    return run([str(BIN / "mlops-notebooks"), "new", str(dest), *args, *extra], REPO)


def fleet_table(rows: int = 10_000, seed: int = 0) -> pd.DataFrame:
    "A fleet motor book unlike the claims example: a claim count over exposure in days, an integer underwriting year."
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 85, rows)
    fuel = rng.choice(["diesel", "petrol", "electric"], rows, p=[0.5, 0.4, 0.1])
    territory = rng.integers(0, 40, rows)
    value = rng.gamma(4.0, 6000.0, rows).round(0)
    days = rng.integers(30, 366, rows)
    territory_factor = np.exp(np.random.default_rng(seed + 1).normal(0, 0.6, 40))[territory]
    rate = (0.6 * np.exp(1.2 * (age < 25) - 0.01 * (age - 40) + 0.4 * (value > 40_000))
            * np.where(fuel == "electric", 0.6, 1.0) * territory_factor)
    return pd.DataFrame({"PolicyRef": [f"P{i:06d}" for i in rng.permutation(rows)],
                         "UWYear": rng.integers(2019, 2024, rows), "ExposureDays": days, "DriverAge": age,
                         "Fuel": fuel, "Territory": [f"T{i:02d}" for i in territory], "VehicleValue": value,
                         "ClaimCount": rng.poisson(rate * days / 365)})


def make(target: str, project) -> subprocess.CompletedProcess:
    "`make target` in a generated project, with its own venv (created from its lock the first time)."
    return run(["make", target], project)


@pytest.mark.slow
def test_a_synthetic_project_runs_its_pipeline_its_tests_and_audits_its_champion(tmp_path):
    project = tmp_path / "acme-claims"
    make_project(project, "--package", "acme_claims", "--model", "acme-cost")
    settings = (project / "settings.ini").read_text()
    assert "registered_model_name = acme-cost" in settings and "experiment_name = acme-cost" in settings
    assert 'lib_name = "acme_claims"' in (project / "pyproject.toml").read_text()
    ingest = (project / "nbs/stages/01_ingest.ipynb").read_text()
    assert "from acme_claims.stages.schema import" in ingest and "mlops_notebooks.stages" not in ingest
    assert "from mlops_notebooks.core.stage import start_stage" in ingest  # the platform, as a dependency
    assert (project / "acme_claims/stages/train.py").exists() and not (project / "mlops_notebooks").exists()
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "acme_claims/stages/ingest.py" in dvc_yaml["ingest"]["deps"]
    assert all("platform" in stage["deps"] for stage in dvc_yaml.values())  # a new platform wheel re-runs them
    wheels = list((project / "platform").glob("mlops_notebooks-*.whl"))
    assert len(wheels) == 1 and f"./platform/{wheels[0].name}" in (project / "requirements.lock").read_text()
    assert "# acme-claims" in (project / "README.md").read_text()
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["package_name"] == "acme_claims" and answers["_src_path"] == str(REPO)
    log = run(["git", "log", "--format=%s"], project).stdout.splitlines()
    assert len(log) == 1 and run(["git", "status", "--porcelain"], project).stdout == ""

    make("pipeline", project)
    # Its own venv, with the platform installed from the wheel (not this working tree's editable install).
    installed = project / ".venv/lib/python3.11/site-packages"
    assert (installed / "mlops_notebooks/core/stage.py").is_file() and not (project / ".venv").is_symlink()
    decision = json.loads((project / "reports/register_decision.json").read_text())
    assert decision["outcome"] == "promoted" and decision["model_name"] == "acme-cost"
    make("test", project)
    audit = run([str(project / ".venv/bin/mlops-notebooks"), "audit", "models:/acme-cost@champion"], project)
    assert "acme-cost version 1" in audit.stdout and "dirty: false" in audit.stdout


@pytest.mark.slow
def test_a_project_from_a_table_of_another_shape_infers_its_params_and_runs(tmp_path):
    table = tmp_path / "fleet.csv"
    fleet_table().to_csv(table, index=False)
    project = tmp_path / "fleet-freq"
    make_project(project, "--data", str(table), "--target", "ClaimCount")
    params = yaml.safe_load((project / "params.yaml").read_text())
    data = params["data"]
    assert (data["source"], data["id"], data["target"], data["period"]) == (
        "data/sources/fleet.csv", "PolicyRef", "ClaimCount", "UWYear")
    assert data["weight"] == "ExposureDays_years" and data["target_per_weight"] is True
    assert data["derived"] == {"ExposureDays_years": {"from": "ExposureDays", "divide_by": 365}}
    assert (sorted(data["categorical"]), sorted(data["numeric"]), data["objective"]) == (
        ["Fuel", "Territory"], ["DriverAge", "VehicleValue"], "poisson")
    assert params["validate"]["categories"]["Fuel"] == ["diesel", "electric", "petrol"]
    assert len(params["validate"]["categories"]["Territory"]) == 40
    assert params["validate"]["ranges"]["DriverAge"][0] == 0
    assert params["features"]["split"] == "time" and params["features"]["test_months"] == 1  # of five years
    assert "# the first column with unique values" in (project / "params.yaml").read_text()
    assert "replay" not in params  # a platform tool's section, not a stage's
    assert (project / "data/sources/fleet.csv").read_bytes() == table.read_bytes()
    assert "data/sources/fleet.csv" in run(["git", "ls-files"], project).stdout

    make("pipeline", project)
    validation = json.loads((project / "reports/validation.json").read_text())
    assert validation["period_unit"] == "year"
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert np.isfinite(metrics["mean_deviance"])
    assert json.loads((project / "reports/register_decision.json").read_text())["outcome"] == "promoted"


@pytest.mark.slow
def test_an_update_from_an_earlier_template_keeps_the_users_edits(tmp_path):
    template = tmp_path / "template"
    run(["git", "clone", "-q", str(REPO), str(template)], tmp_path)
    project = tmp_path / "acme"
    make_project(project, "--package", "acme", template=template)

    # The user's edits: a stage notebook's function, a param, a setting.
    features = project / "nbs/stages/03_features.ipynb"
    text = features.read_text()
    function = '"def split_claims('
    assert function in text
    features.write_text(text.replace(function, '"# our own split rule, kept by updates\\n",\n    "def split_claims(', 1))
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("  max_iter: 200", "  max_iter: 150", 1))
    settings = (project / "settings.ini").read_text()
    (project / "settings.ini").write_text(settings.replace("service_port = 8000", "service_port = 8123"))
    run(["git", "commit", "-qam", "our edits"], project)

    # A later template: a change to a stage notebook and to the Makefile.
    evaluate = template / "nbs/stages/05_evaluate.ipynb"
    evaluate.write_text(evaluate.read_text().replace('"# ', '"# (template v2) ', 1))
    makefile = template / "template/Makefile.jinja"
    makefile.write_text(makefile.read_text() + "\n# template v2\n")
    run(["git", "commit", "-qam", "template v2"], template)

    run([str(BIN / "copier"), "update", "--trust", "--defaults", "--skip-answered", "--vcs-ref", "HEAD"], project)
    assert "(template v2)" in (project / "nbs/stages/05_evaluate.ipynb").read_text()
    assert "# template v2" in (project / "Makefile").read_text()
    updated = (project / "nbs/stages/03_features.ipynb").read_text()
    assert "# our own split rule, kept by updates" in updated and "mlops_notebooks.stages" not in updated
    assert "  max_iter: 150" in (project / "params.yaml").read_text()
    assert "service_port = 8123" in (project / "settings.ini").read_text()
    assert "from acme.stages" in (project / "nbs/stages/05_evaluate.ipynb").read_text()
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == run(["git", "rev-parse", "--short", "HEAD"], template).stdout.strip()
    # The project's tests after the update (with this venv; the project's package from its folder).
    pythonpath = {"PYTHONPATH": str(project)}
    run([str(BIN / "nbdev-export")], project, env=pythonpath)
    run([str(BIN / "mlops-notebooks"), "stages", "generate"], project, env=pythonpath)
    assert "our own split rule" in (project / "acme/stages/features.py").read_text()
    run([str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", "tests"], project, env=pythonpath)


def refused(dest, *args) -> str:
    "The one line `mlops-notebooks new` prints for a bad answer."
    result = run([str(BIN / "mlops-notebooks"), "new", str(dest), *args], REPO, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_answers_get_one_line_each_and_leave_nothing(tmp_path):
    table = tmp_path / "fleet.csv"
    fleet_table(rows=50).to_csv(table, index=False)
    dest = tmp_path / "new"
    assert "package_name 'fleet-freq': not a Python identifier" in refused(dest, "--package", "fleet-freq")
    assert "target 'claims': no such column" in refused(dest, "--data", str(table), "--target", "claims")
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\xff\xfe\x00 not a table \x81")
    assert "garbage.csv" in refused(dest, "--data", str(garbage), "--target", "ClaimCount")
    assert "file not found" in refused(dest, "--data", str(tmp_path / "missing.csv"), "--target", "ClaimCount")
    assert not dest.exists()
    dest.mkdir()
    (dest / "mine.txt").write_text("kept")
    assert "already exists" in refused(dest, "--package", "fleet")
    assert [path.name for path in dest.iterdir()] == ["mine.txt"]


@pytest.mark.slow
def test_a_failing_copier_task_leaves_no_half_made_project(tmp_path):
    "Plain copier, answers unchecked beforehand: the task refuses the target in one line, copier removes the folder."
    table = tmp_path / "fleet.csv"
    fleet_table(rows=50).to_csv(table, index=False)
    dest = tmp_path / "new"
    result = run([str(BIN / "copier"), "copy", "--trust", "--defaults", "--quiet", "--vcs-ref", "HEAD",
                  "--data", "package_name=fleet", "--data", f"data_path={table}", "--data", "target=claims",
                  str(REPO), str(dest)], tmp_path, check=False)
    assert result.returncode != 0
    assert "error: target 'claims': no such column" in result.stderr
    assert not dest.exists()


@pytest.mark.slow
def test_a_notebook_conflict_in_an_update_is_shown_cell_by_cell(tmp_path):
    "Both the user and the template change the same line of a notebook: nbdev-fix makes copier's result a notebook."
    template = tmp_path / "template"
    run(["git", "clone", "-q", str(REPO), str(template)], tmp_path)
    project = tmp_path / "acme"
    make_project(project, "--package", "acme", template=template)
    title = '"# '
    evaluate = project / "nbs/stages/05_evaluate.ipynb"
    evaluate.write_text(evaluate.read_text().replace(title, '"# (ours) ', 1))
    run(["git", "commit", "-qam", "our title"], project)
    upstream = template / "nbs/stages/05_evaluate.ipynb"
    upstream.write_text(upstream.read_text().replace(title, '"# (template v2) ', 1))
    run(["git", "commit", "-qam", "template v2"], template)

    run([str(BIN / "copier"), "update", "--trust", "--defaults", "--skip-answered", "--conflict", "inline",
         "--vcs-ref", "HEAD"], project)
    with pytest.raises(json.JSONDecodeError):
        json.loads(evaluate.read_text())  # copier's conflict markers inside the JSON
    shown = run([str(BIN / "python"), "-m", "mlops_notebooks.tools.new_project", "conflicts"], project, check=False)
    assert shown.returncode == 1 and "nbs/stages/05_evaluate.ipynb" in shown.stderr  # what `make update` runs
    cells = ["".join(cell["source"]) for cell in json.loads(evaluate.read_text())["cells"]]
    marked = [cell for cell in cells if "(ours)" in cell or "(template v2)" in cell]
    assert any("(ours)" in cell for cell in marked) and any("(template v2)" in cell for cell in marked)
    assert "`<<<<<<< yours`" in cells and "`>>>>>>> template`" in cells
