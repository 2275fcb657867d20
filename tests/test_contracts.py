"""Stage contracts: a stale dvc.yaml, each params lint, the undeclared-read guard and add-stage, failing and passing."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import nbformat
import pandas as pd
import yaml
from conftest import BIN, REPO, copy_project, dvc, run, write_params

from mlops_notebooks.tools.pipeline import check_project

CLI = str(BIN / "mlops-notebooks")


def contract_copy(destination: Path) -> Path:
    "What the contract checks read: the notebooks, the library, the params files, dvc.yaml and pyproject.toml."
    shutil.copytree(REPO / "nbs", destination / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(REPO / "mlops_notebooks", destination / "mlops_notebooks", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "params.small.yaml", "dvc.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, destination / name)
    return destination


def edit_contract(project: Path, notebook: str, old: str, new: str):
    "Replace text in a notebook's '## Contract' cell (`notebook` relative to nbs/)."
    path = project / "nbs" / notebook
    nb = nbformat.read(path, 4)
    cell = next(cell for cell in nb.cells if cell.source.startswith("## Contract"))
    assert old in cell.source, cell.source
    cell.source = cell.source.replace(old, new)
    nbformat.write(nb, path)


def edit_params(project: Path, change):
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    write_params(project, params)  # in the layout `dvc exp run -S` writes


# --- stale dvc.yaml -------------------------------------------------------------------------------------------

def test_a_contract_change_makes_dvc_yaml_stale_until_it_is_generated(tmp_path):
    project = contract_copy(tmp_path)
    assert check_project(project) == []
    edit_contract(project, "stages/03_features.ipynb", "  claims: data/interim/claims.parquet\n",
                  "  claims: data/interim/claims.parquet\n  calendar: data/sources/calendar.csv\n")
    assert check_project(project) == [
        "dvc.yaml is stale: stage 'features' (nbs/stages/03_features.ipynb) differs from its contract in deps: "
        "run `mlops-notebooks stages generate`"]
    checked = run([CLI, "stages", "check"], project, check=False)
    assert checked.returncode == 1 and "stage 'features' (nbs/stages/03_features.ipynb)" in checked.stdout
    refused = run([CLI, "repro"], project, check=False)  # what `make pipeline` runs: DVC never starts
    assert refused.returncode == 2 and refused.stderr.startswith("dvc.yaml is stale: stage 'features'"), refused.stderr
    assert not (project / "dvc.lock").exists() and not (project / "data/raw/claims.parquet").exists()

    run([CLI, "stages", "generate"], project)
    assert "data/sources/calendar.csv" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["features"]["deps"]
    assert check_project(project) == []
    assert run([CLI, "stages", "check"], project).returncode == 0


def test_a_hand_edit_of_dvc_yaml_is_stale_and_handwritten_stages_survive(tmp_path):
    project = contract_copy(tmp_path)
    text = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(text.replace("    metrics:\n      - reports/metrics.json\n", "", 1))
    problems = check_project(project)
    assert len(problems) == 1 and problems[0].startswith("dvc.yaml is stale: stage 'evaluate' (nbs/stages/05_evaluate.ipynb)")

    (project / "dvc.handwritten.yaml").write_text(
        "stages:\n  fetch:\n    cmd: cp ../shared/claims.csv data/sources/claims.csv\n    outs:\n"
        "      - data/sources/claims.csv\n")
    run([CLI, "stages", "generate"], project)
    generated = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert list(generated)[-1] == "fetch" and generated["fetch"]["outs"] == ["data/sources/claims.csv"]
    assert generated["evaluate"]["metrics"] == ["reports/metrics.json"]
    assert check_project(project) == []
    run([CLI, "stages", "generate"], project)  # regenerating again keeps it
    assert "fetch" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


# --- params lints ---------------------------------------------------------------------------------------------

def test_a_param_its_model_refuses_is_named_before_any_stage_runs(tmp_path):
    project = contract_copy(tmp_path)
    edit_params(project, lambda params: params["train"].update(learning_rat=0.3))
    assert check_project(project) == ["params.yaml: train.learning_rat: unknown key"]
    edit_params(project, lambda params: params["train"].pop("learning_rat"))
    edit_params(project, lambda params: params["features"].update(test_months="six"))
    assert check_project(project) == ["params.yaml: features.test_months: input should be a valid integer, unable to "
                                      "parse string as an integer (got 'six')"]


def test_a_small_override_that_changes_a_value_s_type_or_names_a_missing_key_is_named(tmp_path):
    project = contract_copy(tmp_path)
    (project / "params.small.yaml").write_text("train: {max_iter: 40.5, max_iterations: 10}\ndata: {period: 3}\n")
    problems = check_project(project)
    assert "params.small.yaml: train.max_iterations: not in params.yaml (only values params.yaml has can be made smaller)" in problems
    assert "params.small.yaml: data.period: a number where params.yaml has str (3 against 'report_month')" in problems
    assert any(problem.startswith("params.yaml with params.small.yaml: train.max_iter: input should be a valid integer, "
                                  "got a number with a fractional part (got 40.5)") for problem in problems), problems


def test_a_parameters_cell_that_reads_other_sections_than_its_contract_is_named(tmp_path):
    project = contract_copy(tmp_path)
    path = project / "nbs/stages/03_features.ipynb"
    nb = nbformat.read(path, 4)
    cell = next(cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", []))
    cell.source = cell.source.replace('data, features = interactive_params("data", "features")',
                                      'data, features, train = interactive_params("data", "features", "train")')
    nbformat.write(nb, path)
    problems = check_project(project)
    assert ("nbs/stages/03_features.ipynb (stage features): parameters cell reads ['data', 'features', 'train'], "
            "its contract's params are ['data', 'features']") in problems, problems


def test_a_params_section_read_but_not_declared_is_named(tmp_path):
    project = contract_copy(tmp_path)
    edit_contract(project, "stages/04_train.ipynb", "params: [data, features, train]", "params: [features, train]")
    run([CLI, "stages", "generate"], project)
    problems = check_project(project)
    assert problems == [
        "nbs/stages/04_train.ipynb (stage train): parameters cell reads ['data', 'features', 'train'], its contract's "
        "params are ['features', 'train']",
        "nbs/stages/04_train.ipynb (stage train): reads params section 'data' (its parameters cell) but its contract's "
        "params do not declare it"], problems


def test_a_params_section_read_by_no_stage_is_named(tmp_path):
    project = contract_copy(tmp_path)
    edit_params(project, lambda params: params.update(calibration={"bins": 10}))
    assert check_project(project) == [
        "params.yaml: section 'calibration' is read by no stage (no notebook's contract declares it; "
        "a reader that is not a DVC stage declares it with a `command:` contract)"]

    # The replay command's contract is what makes its section count as read.
    edit_params(project, lambda params: params.pop("calibration"))
    edit_contract(project, "tools/03_replay.ipynb", "params: [data, train, register, monitor, replay]", "params: [data]")
    problems = check_project(project)
    assert "params.yaml: section 'replay' is read by no stage" in "\n".join(problems)


def test_a_malformed_contract_is_one_line_naming_the_notebook(tmp_path):
    project = contract_copy(tmp_path)
    edit_contract(project, "stages/02_validate.ipynb", "outputs:", "outputz:")
    assert check_project(project) == ["nbs/stages/02_validate.ipynb: contract: unknown key(s) outputz "
                                      "(known: stage, command, params, inputs, outputs, metrics, plots)"]


# --- the undeclared-read guard (in a fresh process: an audit hook cannot be removed) ---------------------------

GUARDED_READS = textwrap.dedent("""
    import json, sys
    import pandas as pd
    from pathlib import Path
    from mlops_notebooks.core.contracts import UndeclaredRead, find_contract, guard_undeclared_reads
    guard_undeclared_reads(find_contract(Path.cwd(), "features"), Path.cwd())
    results = {}
    def attempt(name, read):
        try:
            read()
            results[name] = "ok"
        except UndeclaredRead as error:
            results[name] = str(error)
    attempt("declared parquet", lambda: pd.read_parquet("data/interim/claims.parquet"))
    attempt("undeclared parquet", lambda: pd.read_parquet("data/raw/claims.parquet"))
    attempt("undeclared json", lambda: open("reports/metrics.json").read())
    attempt("own output read back", lambda: pd.read_parquet("data/processed/train.parquet"))
    attempt("write elsewhere", lambda: open("reports/scratch.txt", "w").write("x"))
    attempt("outside the watched folders", lambda: open("params.yaml").read())
    print(json.dumps(results))
""")


def test_the_guard_stops_undeclared_reads_and_lets_declared_ones_pass(tmp_path):
    project = contract_copy(tmp_path)
    frame = pd.DataFrame({"claim_id": [1, 2]})
    for relative in ("data/interim/claims.parquet", "data/raw/claims.parquet", "data/processed/train.parquet"):
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(project / relative)
    (project / "reports").mkdir()
    (project / "reports/metrics.json").write_text("{}")
    result = run([sys.executable, "-c", GUARDED_READS], project)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["declared parquet"] == "ok"
    assert outcome["own output read back"] == "ok"
    assert outcome["write elsewhere"] == "ok"
    assert outcome["outside the watched folders"] == "ok"
    assert outcome["undeclared parquet"].startswith(
        "data/raw/claims.parquet: stage 'features' read a file its contract does not declare; "
        "add it to the inputs in the '## Contract' cell of nbs/stages/03_features.ipynb")
    assert outcome["undeclared json"].startswith("reports/metrics.json: stage 'features' read a file")


# --- add a stage ------------------------------------------------------------------------------------------------

def test_add_stage_refuses_bad_input_and_changes_nothing(tmp_path):
    project = contract_copy(tmp_path)
    before = {path: path.read_bytes() for path in [project / "params.yaml", project / "dvc.yaml"]}
    notebooks = sorted((project / "nbs").rglob("*"))
    for args, expected in [(["claims_summary", "--after", "scoring"], "no such stage"),
                           (["Claims-Summary", "--after", "ingest"], "lower case letters"),
                           (["train", "--after", "ingest"], "'train' is already a stage")]:
        result = run([CLI, "add-stage", *args], project, check=False)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert sorted((project / "nbs").rglob("*")) == notebooks
    assert {path: path.read_bytes() for path in before} == before


def test_add_stage_creates_a_stage_that_dvc_runs_and_that_the_guard_holds_to_its_contract(tmp_path):
    project = copy_project(tmp_path / "project")
    number = max(int(path.name[:2]) for path in (project / "nbs/stages").glob("[0-9][0-9]_*.ipynb")) + 1  # the next free one
    name = f"stages/{number:02d}_claims_summary.ipynb"
    created = run([CLI, "add-stage", "claims_summary", "--after", "ingest"], project)
    assert f"created nbs/{name}" in created.stdout
    notebook = nbformat.read(project / f"nbs/{name}", 4)
    sources = [cell.source for cell in notebook.cells]
    assert sources[0] == "#| default_exp stages.claims_summary"
    assert any(cell.metadata.get("tags") == ["parameters"] for cell in notebook.cells)
    assert any(source.startswith("#| export\ndef summarise_table") for source in sources)
    assert any(source.startswith("#| pipeline") for source in sources)
    assert (project / "mlops_notebooks/stages/claims_summary.py").exists()
    assert yaml.safe_load((project / "params.yaml").read_text())["claims_summary"] == {"max_columns": 20}
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["claims_summary"]
    assert "data/raw/claims.parquet" in stage["deps"] and "mlops_notebooks/core/stage.py" in stage["deps"]
    assert run([CLI, "stages", "check"], project).returncode == 0
    run([str(BIN / "nbdev-test"), f"nbs/{name}"], project)  # its example cell passes

    dvc(project, "repro", "claims_summary")
    summary = json.loads((project / "reports/claims_summary.json").read_text())
    assert summary["claims"]["rows"] > 0
    assert (project / f"reports/{Path(name).name}").exists()

    # A read the contract does not declare stops the stage, naming the file.
    notebook.cells.append(nbformat.v4.new_code_cell("#| pipeline\nopen(stage.root / 'reports/01_ingest.ipynb').read()"))
    nbformat.write(notebook, project / f"nbs/{name}")
    failed = dvc(project, "repro", "claims_summary", check=False)
    assert failed.returncode != 0
    assert "UndeclaredRead: reports/01_ingest.ipynb: stage 'claims_summary' read a file its contract does not declare" \
        in failed.stdout + failed.stderr

    # Declared in the contract and regenerated, the same read passes.
    edit_contract(project, name, "  claims: data/raw/claims.parquet\n",
                  "  claims: data/raw/claims.parquet\n  ingest_report: reports/01_ingest.ipynb\n")
    run([CLI, "stages", "generate"], project)
    dvc(project, "repro", "claims_summary")
