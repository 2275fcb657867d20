"""Notebooks are the source: the exported modules match them, they are committed clean, and the rooms keep apart."""
import ast
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from conftest import BIN, REPO

NOTEBOOKS = sorted(path for path in (REPO / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in path.parts)


def _copy_sources(destination: Path):
    shutil.copytree(REPO / "nbs", destination / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
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
    dirty = [path.relative_to(REPO).as_posix() for path in NOTEBOOKS
             if path.read_bytes() != (tmp_path / path.relative_to(REPO)).read_bytes()]
    assert not dirty, f"notebooks not clean: {dirty}: run `make export` (it runs nbdev-clean) and commit"


STAGE_NOTEBOOKS = [path for path in NOTEBOOKS
                   if any(cell.source.startswith("## Contract") and "stage:" in cell.source
                          for cell in nbformat.read(path, 4).cells if cell.cell_type == "markdown")]


def test_the_stage_notebooks_are_the_stages_room_in_pipeline_order():
    names = [path.relative_to(REPO / "nbs").as_posix() for path in STAGE_NOTEBOOKS]
    assert names == ["stages/01_ingest.ipynb", "stages/02_validate.ipynb", "stages/03_features.ipynb",
                     "stages/04_train.ipynb", "stages/05_evaluate.ipynb", "stages/06_register.ipynb",
                     "stages/07_monitor.ipynb"], names


@pytest.mark.parametrize("notebook", STAGE_NOTEBOOKS, ids=lambda path: path.name)
def test_stage_notebook_keeps_its_parameters_cell(notebook):
    cells = nbformat.read(notebook, 4).cells
    tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: expected one cell tagged 'parameters' (papermill), found {len(tagged)}"
    assert "interactive_params(" in tagged[0].source, f"{notebook.name}: the parameters cell reads interactive_params"
    assert cells[0].source.startswith("#| default_exp stages."), f"{notebook.name}: first cell must be #| default_exp"


def test_every_stage_notebook_is_a_dvc_stage():
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    for notebook in STAGE_NOTEBOOKS:
        relative = notebook.relative_to(REPO).as_posix()
        assert f"--log-level ERROR {relative} reports/{notebook.name} -f params.yaml" in dvc_yaml, relative


def test_dvc_yaml_is_generated_and_params_agree_with_the_contracts():
    "dvc.yaml is what the notebooks' contracts generate; the params files, parameters cells and contracts agree."
    from mlops_notebooks.tools.pipeline import check_project
    problems = check_project(REPO)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("example", sorted(path.name for path in (REPO / "examples/fremtpl2").glob("*.yaml")))
def test_the_example_params_files_agree_with_the_contracts(example, tmp_path):
    "`make fremtpl2-*` makes an example the params.yaml: `make test` must still pass afterwards."
    from mlops_notebooks.tools.pipeline import lint_params
    _copy_sources(tmp_path)
    shutil.copy(REPO / "examples/fremtpl2" / example, tmp_path / "params.yaml")
    shutil.copy(REPO / "params.small.yaml", tmp_path / "params.small.yaml")
    problems = lint_params(tmp_path)
    assert not problems, "\n".join(problems)


# The floors of the house, every import pointing down: tools -> serving -> stages -> core. A stage never imports
# serving, docs, CLI or team code, and core imports nothing above it, so dvc.yaml's code deps (found from imports)
# re-run exactly the stages whose code changed.
FLOORS = {"core": 0, "stages": 1, "serving": 2, "tools": 3}


def _library_imports(path: Path) -> set[str]:
    "The mlops_notebooks modules a module imports (anywhere in it, functions included), as dotted names."
    tree = ast.parse(path.read_text())
    package = path.relative_to(REPO).parent.as_posix().replace("/", ".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mlops_notebooks."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .settings import x
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module and node.module.startswith("mlops_notebooks."):
                found.add(node.module)
    return found


LIBRARY_MODULES = sorted(path for path in (REPO / "mlops_notebooks").rglob("*.py")
                         if path.name not in ("__init__.py", "_modidx.py"))


@pytest.mark.parametrize("module", LIBRARY_MODULES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_imports_point_down_the_floors(module):
    floor = module.relative_to(REPO / "mlops_notebooks").parts[0]
    above = sorted(name for name in _library_imports(module)
                   if FLOORS[name.split(".")[1]] > FLOORS[floor])
    assert not above, f"{module.relative_to(REPO)} ({floor}) imports {above}, which sit above it"


def test_the_floor_check_catches_a_stage_importing_serving(tmp_path):
    "The check above can fail: a stage module that imports the service is caught."
    bad = REPO / "mlops_notebooks/stages/_probe_for_the_floor_test.py"
    bad.write_text("def f():\n    from mlops_notebooks.serving.serve import create_app\n")
    try:
        with pytest.raises(AssertionError, match="sit above it"):
            test_imports_point_down_the_floors(bad)
    finally:
        bad.unlink()


def test_the_benchmarks_page_is_what_the_records_give():
    "docs/benchmarks.md is generated from benchmarks/results/*.json: a figure lives in its record only."
    import importlib.util
    spec = importlib.util.spec_from_file_location("page", REPO / "benchmarks/support/page.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    assert (REPO / "docs/benchmarks.md").read_text() == page.render(), \
        "docs/benchmarks.md is stale: run `python benchmarks/support/page.py` and commit it"


def test_the_readme_is_a_front_door():
    "The README stays short (<= 8 KB) and quotes no benchmark figures: they live in benchmarks/results/."
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 8 * 1024, len(readme.encode())
    for noise in ("slow hour", "fast hour", "median of", "earlier records"):
        assert noise not in readme, noise


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO / "benchmarks").glob("*.py")))
def test_each_benchmark_script_imports(script):
    "A benchmark is run by hand, so a broken import would show only then: each script's module loads (without running)."
    import importlib.util
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{Path(script).stem}", REPO / "benchmarks" / script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _script_stages():
    import importlib.util
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("script_stages", REPO / "benchmarks/support/script_stages.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.parametrize("notebook", sorted(path.name for path in (REPO / "nbs/stages").glob("0*.ipynb")))
def test_notebook_tax_scripts_run_the_cells_the_stage_runs(notebook, tmp_path):
    "notebook_tax's script form holds every pipeline cell of the stage, no example and no parameters cell, and compiles."
    script_stages = _script_stages()
    (tmp_path / "nbs/stages").mkdir(parents=True)
    shutil.copy(REPO / "nbs/stages" / notebook, tmp_path / "nbs/stages" / notebook)
    script = script_stages.write_stage_script(tmp_path, f"nbs/stages/{notebook}", "stage")
    tree = ast.parse((tmp_path / script).read_text())  # compiles; not run: it would mark this process a pipeline run
    listed = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "CELLS")
    sources = [source for _, source in ast.literal_eval(listed)]
    cells = nbformat.read(REPO / "nbs/stages" / notebook, as_version=4).cells
    pipeline = [cell.source for cell in cells if cell.cell_type == "code" and cell.source.startswith("#| pipeline")]
    assert pipeline and all(source in sources for source in pipeline)
    assert not any("parameters" in cell.metadata.get("tags", []) and cell.source in sources for cell in cells)
    assert not any(source.startswith("#| hide") for source in sources), "an example cell would be timed"


def test_notebook_tax_scripts_refuse_ipython_syntax(tmp_path):
    script_stages = _script_stages()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("#| pipeline\n%time x = 1")])
    (tmp_path / "stage.ipynb").write_text(nbformat.writes(notebook))
    with pytest.raises(SystemExit, match=r"stage.ipynb cell 0: IPython syntax"):
        script_stages.write_stage_script(tmp_path, "stage.ipynb", "stage")
