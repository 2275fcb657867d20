"""The documentation site: built from a project that has run the pipeline, every page loaded in headless Chromium."""
import contextlib
import functools
import json
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
from chromium import Chromium
from conftest import BIN, REPO, copy_project, run

from mlops_notebooks.tools.docs import NO_REPORTS, broken_links, library_notebooks

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots, kept for people to look at (git-ignored)
SCREENSHOTS = {"index.html": "home.png", "api/stages/03_features.html": "api_features.png",
               "reports/05_evaluate.html": "report_evaluate.png"}


def build_docs(project: Path, check: bool = True):
    "What `make docs` runs, in `project`."
    return run([str(BIN / "python"), "-m", "mlops_notebooks.tools.docs"], project, check=check)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path):
    "Serve `folder` over HTTP on a free port of 127.0.0.1; yields the base URL."
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def site(repro_project) -> Path:
    build_docs(repro_project)
    return repro_project / "_docs"


@pytest.fixture(scope="module")
def browser():
    # No skip: CI must have Chromium (`make test` installs it through `make browser`).
    assert shutil.which("chromium"), "chromium is not installed: run `make browser`"
    with Chromium() as chromium:
        yield chromium


def _html(site: Path, page: str) -> str:
    return (site / page).read_text(encoding="utf-8")


def test_site_has_every_page(site, repro_project):
    for page in ["index.html", "add-a-stage.html", "own-data.html", "tracking-server.html", "reports/index.html",
                 "model-card.html"]:
        assert (site / page).is_file(), page
    modules = library_notebooks(repro_project)
    assert len(modules) >= 10
    for notebook in modules:
        page = notebook.relative_to(repro_project / "nbs").with_suffix(".html")
        assert (site / "api" / page).is_file(), page
    reports = sorted((repro_project / "reports").glob("[0-9][0-9]_*.ipynb"))
    assert {"01_ingest", "02_validate", "03_features", "04_train", "05_evaluate", "06_register", "07_monitor"} <= {
        path.stem for path in reports}
    for report in reports:
        assert (site / "reports" / f"{report.stem}.html").is_file(), report.name


def test_api_page_shows_signatures_argument_tables_and_examples(site):
    page = _html(site, "api/stages/03_features.html")
    assert "split_by_month" in page and "latest months to hold out" in page
    assert re.search(r"<td>test_months</td>\s*<td>int</td>\s*<td></td>\s*<td>latest months to hold out</td>", page)
    assert "time split: the latest report months held out" in page  # FeaturesParams' field table
    assert "no training claim may come after a test claim" in page     # an example cell
    assert "#|" not in page and "&quot;parameters&quot;" not in page


def test_report_pages_hold_the_run_and_its_plots(site, repro_project):
    evaluate = _html(site, "reports/05_evaluate.html")
    assert "Executed by <code>dvc repro</code>" in evaluate
    images = re.findall(r'<img[^>]+src="([^"]+)"', evaluate)
    assert images and all((site / "reports" / src).is_file() for src in images)
    overview = _html(site, "reports/index.html")
    metrics = json.loads((repro_project / "reports" / "metrics.json").read_text())
    assert NO_REPORTS not in overview
    for plot in (repro_project / "reports" / "plots").glob("*.png"):
        assert f'src="plots/{plot.name}"' in overview
    assert "test.r2" in overview or "r2" in overview
    assert any(f"{value:.6g}" in overview for value in _numbers(metrics))


def _numbers(payload):
    for value in payload.values():
        if isinstance(value, dict):
            yield from _numbers(value)
        elif isinstance(value, float):
            yield value


def test_model_card_describes_the_champion(site, repro_project):
    decision = json.loads((repro_project / "reports" / "register_decision.json").read_text())
    assert decision["outcome"] == "promoted"  # the first run of a fresh store promotes its model
    card = _html(site, "model-card.html")
    assert f"version <strong>{decision['challenger']['version']}</strong>" in card
    assert decision["challenger"]["run_id"] in card
    assert "training_window" in card and "data/processed/train.parquet" in card
    assert "finite_predictions" in card and "<strong>promoted</strong>" in card


def test_no_broken_internal_links(site):
    assert broken_links(site) == []


def test_every_page_loads_cleanly_in_chromium(site, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html"))
    assert len(pages) >= 20
    problems = {}
    with serve(site) as base:
        for page in pages:
            shot = SCREENSHOTS.get(page)
            report = browser.load(base + page, screenshot=ARTIFACTS / shot if shot else None,
                                  full_page=page.startswith("reports/"))
            if report.problems:
                problems[page] = report.problems
    assert problems == {}
    for name in SCREENSHOTS.values():
        assert (ARTIFACTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkers_catch_a_broken_page(site, browser, tmp_path):
    "The checks can fail: a copy of the site with a broken image, a bad link, a script error and a foreign request."
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    home = broken / "index.html"
    home.write_text(home.read_text(encoding="utf-8").replace(
        "</body>", '<img src="missing.png"><a href="nowhere.html">x</a>'
                   '<img src="http://127.0.0.2:9/elsewhere.png">'
                   "<script>console.error('injected error'); undefinedFunction();</script></body>"), encoding="utf-8")
    assert sorted(broken_links(broken)) == ["index.html -> missing.png", "index.html -> nowhere.html"]
    with serve(broken) as base:
        report = browser.load(base + "index.html")
    assert any("injected error" in text for text in report.console_errors)
    assert any("undefinedFunction" in text for text in report.console_errors)
    assert any(url.endswith("/missing.png") for url in report.broken_images)
    assert any(text.startswith("404 ") and text.endswith("/missing.png") for text in report.failed_requests)
    assert report.foreign_requests == ["http://127.0.0.2:9/elsewhere.png"]


def test_site_builds_before_any_run_and_stops_on_a_bad_notebook(tmp_path):
    project = copy_project(tmp_path / "project")
    build_docs(project)
    site = project / "_docs"
    assert NO_REPORTS.split(":")[0] in _html(site, "reports/index.html")
    assert "No champion" in _html(site, "model-card.html")
    assert not (project / "mlflow.db").exists(), "reading the registry must not create a store"

    # A library notebook whose module was never exported: one line naming it; the last good site is kept.
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("#| default_exp stages.nowhere"),
                                               nbformat.v4.new_markdown_cell("# Nowhere"),
                                               nbformat.v4.new_code_cell("#| export\ndef f(): pass")])
    nbformat.write(notebook, project / "nbs/stages/08_nowhere.ipynb")
    result = build_docs(project, check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "nbs/stages/08_nowhere.ipynb" in message[0] and "mlops_notebooks.stages.nowhere" in message[0]
    assert "Traceback" not in result.stderr
    assert (site / "index.html").is_file()


def _quickstart_commands(markdown: str) -> list[str]:
    "The commands (comments dropped) of the first ```bash block."
    block = re.search(r"```bash\n(.*?)```", markdown, re.DOTALL).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_quickstart_is_the_home_page_quickstart():
    "The README and the docs home (nbs/index.ipynb) give the same quick-start commands."
    home = nbformat.read(REPO / "nbs" / "index.ipynb", as_version=4)
    home_markdown = "\n\n".join(cell.source for cell in home.cells if cell.cell_type == "markdown")
    readme = (REPO / "README.md").read_text()
    assert _quickstart_commands(readme) == _quickstart_commands(home_markdown)
    assert "make docs" in _quickstart_commands(readme)
