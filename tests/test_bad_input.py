"""A bad param, a broken or incomplete file, a missing input: one clear message, nothing half-written."""
import yaml

from conftest import BIN, copy_project, dvc, merge, run, write_params


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
    (project / "claims.csv").write_text("claim_id,report_month\n1,2023-01\n2,2023-02,extra,fields\n")
    _with_params(project, {"ingest": {"source": "claims.csv"}})
    output = _failure(project)
    assert "DataError:" in output and "claims.csv: not a well-formed CSV" in output
    assert not (project / "data/raw/claims.parquet").exists()


def test_a_csv_missing_a_column_stops_validation(tmp_path):
    project = copy_project(tmp_path)
    from mlops_notebooks.ingest import generate_claims
    claims = generate_claims(2000, "2023-01", 12, seed=0).drop(columns=["litigation"])
    claims.loc[5, "ultimate_cost"] = -1.0
    claims.to_csv(project / "claims.csv", index=False)
    _with_params(project, {"ingest": {"source": "claims.csv"}})
    output = _failure(project)
    assert "DataError: data/raw/claims.parquet breaks the claims schema" in output
    assert "column 'litigation': missing" in output
    assert "column 'ultimate_cost': 1 value(s) fail greater_than(0): -1.0 (first at row 5)" in output
    assert not (project / "data/interim/claims.parquet").exists()


def test_a_missing_input_names_the_stage_that_makes_it(tmp_path):
    project = copy_project(tmp_path)
    result = run([str(BIN / "papermill"), "--log-level", "ERROR", "nbs/04_features.ipynb", "reports/04_features.ipynb",
                  "-f", "params.yaml"], project, check=False)
    assert result.returncode != 0
    assert ("DataError: " + str(project / "data/interim/claims.parquet") +
            ": input not found; it is written by the 'validate' stage") in result.stderr
    assert not (project / "data/processed").exists()
