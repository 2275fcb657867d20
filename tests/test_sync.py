"""Notebooks are the source: the exported modules must match them and they must be committed clean."""
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, REPO


def _copy_sources(destination: Path):
    shutil.copytree(REPO / "nbs", destination / "nbs")
    shutil.copytree(REPO / "mlops_notebooks", destination / "mlops_notebooks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", destination / "pyproject.toml")


def _tree(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


def test_exported_modules_match_the_notebooks(tmp_path):
    _copy_sources(tmp_path)
    subprocess.run([str(BIN / "nbdev-export")], cwd=tmp_path, check=True, capture_output=True)
    exported, committed = _tree(tmp_path / "mlops_notebooks"), _tree(REPO / "mlops_notebooks")
    stale = sorted(name for name in exported.keys() | committed.keys() if exported.get(name) != committed.get(name))
    assert not stale, f"mlops_notebooks/ is out of sync with nbs/ for {stale}: run `make export` and commit both"


def test_notebooks_are_committed_clean(tmp_path):
    _copy_sources(tmp_path)
    subprocess.run([str(BIN / "nbdev-clean")], cwd=tmp_path, check=True, capture_output=True)
    dirty = [path.name for path in sorted((REPO / "nbs").glob("*.ipynb"))
             if path.read_bytes() != (tmp_path / "nbs" / path.name).read_bytes()]
    assert not dirty, f"notebooks not clean: {dirty}: run `make export` (it runs nbdev-clean) and commit"


STAGE_NOTEBOOKS = sorted(path for path in (REPO / "nbs").glob("0*.ipynb")
                         if any("#| pipeline" in cell.source for cell in nbformat.read(path, 4).cells))


@pytest.mark.parametrize("notebook", STAGE_NOTEBOOKS, ids=lambda path: path.name)
def test_stage_notebook_keeps_its_parameters_cell(notebook):
    cells = nbformat.read(notebook, 4).cells
    tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: expected one cell tagged 'parameters' (papermill), found {len(tagged)}"
    assert cells[0].source.startswith("#| default_exp"), f"{notebook.name}: first cell must be #| default_exp"


def test_every_stage_notebook_is_a_dvc_stage():
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    assert len(STAGE_NOTEBOOKS) >= 5
    for notebook in STAGE_NOTEBOOKS:
        assert f"papermill --engine stage --no-progress-bar --log-level ERROR nbs/{notebook.name} reports/{notebook.name}" in dvc_yaml, notebook.name


def test_dvc_yaml_is_generated_and_params_agree_with_the_contracts():
    "dvc.yaml is what the notebooks' contracts generate; params.yaml, parameters cells and contracts agree."
    from mlops_notebooks.tools.pipeline import check_project
    problems = check_project(REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("example", sorted(path.name for path in (REPO / "examples/fremtpl2").glob("*.yaml")))
def test_the_example_params_files_agree_with_the_contracts(example, tmp_path):
    "`make fremtpl2-*` makes an example the params.yaml: `make test` must still pass afterwards."
    from mlops_notebooks.tools.pipeline import lint_params
    for name in ("nbs", "mlops_notebooks"):
        shutil.copytree(REPO / name, tmp_path / name)
    shutil.copy(REPO / "examples/fremtpl2" / example, tmp_path / "params.yaml")
    problems = lint_params(tmp_path)
    assert not problems, "\n".join(problems)
