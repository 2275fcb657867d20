"""The documentation site: built from a project that has run the pipeline, every page loaded in headless Chromium."""
import contextlib
import functools
import html
import json
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
import yaml
from chromium import Chromium
from conftest import BIN, REPO, copy_project, dvc, run

from mlops_notebooks.tools.docs import NO_REPORTS, broken_links, format_number, library_notebooks

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs it; `make test` does not

ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots, kept for people to look at (git-ignored)
SCREENSHOTS = {"index.html": "home.png", "api/stages/03_features.html": "api_features.png",
               "reports/05_evaluate.html": "report_evaluate.png", "reports/07_monitor.html": "report_monitor.png",
               "model-card.html": "model_card.png", "api/tools/00_cli.html": "api_cli.png"}
FULL_PAGE = ("index.html", "model-card.html", "reports/")  # screenshots of the whole page, not the first screen
DOCS_CACHE = {}  # one cache of processed notebooks for every project the tests build (the same notebooks)


def build_docs(project: Path, check: bool = True):
    "What `make docs` runs, in `project` (sharing the processed notebooks with the other builds of this session)."
    return run([str(BIN / "python"), "-m", "mlops_notebooks.tools.docs"], project, check=check,
               env={"MLOPS_DOCS_CACHE": str(DOCS_CACHE["path"])})


@pytest.fixture(scope="module", autouse=True)
def docs_cache(tmp_path_factory):
    DOCS_CACHE["path"] = tmp_path_factory.mktemp("docs_cache")
    yield DOCS_CACHE["path"]


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
def site(repro_project, docs_cache) -> Path:
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


def test_start_a_new_project_comes_first_after_the_home_page(site):
    home = _html(site, "index.html")
    assert "Start a new project" in _html(site, "new-project.html")
    assert 0 <= home.find('href="new-project.html"') < home.find('href="add-a-stage.html"')  # before the guides


def test_api_page_shows_signatures_argument_tables_and_examples(site):
    page = _html(site, "api/stages/03_features.html")
    assert "split_by_month" in page and "latest months to hold out" in page
    assert re.search(r"<td>test_months</td>\s*<td>int</td>\s*<td></td>\s*<td>latest months to hold out</td>", page)
    assert "time split: the latest report months held out (≥ 1)" in page  # FeaturesParams' field table
    assert "no training claim may come after a test claim" in page     # an example cell
    assert "#|" not in page and "&quot;parameters&quot;" not in page
    source = re.search(r'Source: <a href="([^"]+)"><code>nbs/stages/03_features.ipynb</code></a>', page)
    assert source and (site / "api" / "stages" / source.group(1)).is_file()


def test_api_pages_read_as_a_person_writes(site):
    "No pydantic internals or inferred NoneType; the examples ran and show their output; the CLI page has every --help."
    pages = {path.relative_to(site).as_posix(): path.read_text(encoding="utf-8") for path in (site / "api").rglob("*.html")}
    for name, page in pages.items():
        assert not re.search(r":NoneType=None|<td>NoneType</td>|\((Ge|Le|Gt|Lt)\(", page), name
    register = pages["api/stages/06_register.html"]
    assert "(≥ 0, ≤ 1)" in register
    docs = pages["api/tools/02_docs.html"]
    assert 'class="docs-output' in docs and "| min_relative_improvement |" in docs, "an example's printed output"
    assert sum(page.count('class="docs-output') for page in pages.values()) >= 15
    cli = pages["api/tools/00_cli.html"]
    for command in ("mlops-notebooks audit", "mlops-notebooks serve", "mlops-notebooks score", "mlops-notebooks stages",
                    "mlops-notebooks stack", "mlops-notebooks remote"):
        assert f"<code>{command}</code>" in cli and f"usage: {command}" in cli, command


def test_home_page_pictures_the_pipeline_and_links_the_latest_run(site, repro_project):
    home = _html(site, "index.html")
    picture = re.search(r'<img alt="svg" src="(index_files/[^"]+\.svg)"', home)
    assert picture, "the pipeline picture"
    svg = (site / picture.group(1)).read_text()
    stages = yaml.safe_load((repro_project / "dvc.yaml").read_text())["stages"]
    assert all(f">{name}<" in svg for name in stages) and "MLflow registry" in svg and "make retrain" in svg
    for target in ("model-card.html", "reports/05_evaluate.html", "reports/07_monitor.html", "fatigue.html",
                   "fatigue/timeline.png"):
        assert f'"{target}"' in home, target
    verdict = json.loads((repro_project / "reports/monitor_verdict.json").read_text())["verdict"]
    assert f"<strong>{verdict}</strong>" in home


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
    assert "d2" in overview
    assert any(format_number(value) in overview for value in _numbers(metrics))


def test_reports_show_results_not_unit_tests(site, repro_project):
    "The examples the engine did not run are left out; the code is folded; tables are formatted; the monitor has a verdict."
    for path in sorted((repro_project / "reports").glob("[0-9][0-9]_*.ipynb")):
        page = _html(site, f"reports/{path.stem}.html")
        executed = nbformat.read(path, as_version=4)
        skipped = [cell.source for cell in executed.cells if "skip-execution" in cell.metadata.get("tags", [])
                   and not cell.source.startswith("#| default_exp")]
        assert skipped, f"{path.name}: the engine tags the cells it did not run"
        for source in skipped:
            first_line = next(line for line in source.splitlines() if line.strip() and not line.startswith("#|"))
            assert html.escape(first_line.strip(), quote=False) not in page, (path.name, first_line)
        assert '<details class="code">' in page and 'class="docs-output' in page, path.name
        assert "NaN" not in re.sub(r"<details.*?</details>", "", page, flags=re.S), path.name
    evaluate = _html(site, "reports/05_evaluate.html")
    rows = json.loads((repro_project / "reports/metrics.json").read_text())["rows"]
    assert f'<td class="number">{rows:,}</td>' in evaluate, "the metrics table, formatted"
    monitor = _html(site, "reports/07_monitor.html")
    verdict = json.loads((repro_project / "reports/monitor_verdict.json").read_text())["verdict"]
    assert 'class="monitor-verdict"' in monitor and f"<strong>Verdict: {verdict}</strong>" in monitor
    assert re.search(r'<img[^>]+src="07_monitor_files/', monitor), "a plot even when there is no batch"


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
    assert decision["challenger"]["run_id"] in card and "data/processed/train.parquet" in card
    for heading in ("Intended use", "Out of scope", "Algorithm and objective", "Training data", "Metrics",
                    "Calibration: actual over expected", "Limitations and known drift", "Lineage", "The gate's decision"):
        assert f">{heading}<" in card, heading
    assert "Not stated" not in card, "model_card.yaml states every section"
    assert "Overall A/E <strong>" in card and "predicted decile" in card and "line_of_business" in card
    assert "the data the gate judged this version on (same DVC hash)" in card
    assert card.count("finite_predictions") == 1 and card.count("<strong>promoted</strong> at") == 2, \
        "the decision once (and its outcome in the summary table)"
    window = json.loads((repro_project / "models/train_run.json").read_text())["training_window"]
    assert f"Window {window}" in card


def test_no_broken_internal_links(site):
    assert broken_links(site) == []


def test_every_page_loads_cleanly_in_chromium(site, browser):
    "Every page loads without errors, code fits its column, tables stay in the content, reports show their results."
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html"))
    assert len(pages) >= 20
    problems, reports = {}, {}
    with serve(site) as base:
        for page in pages:
            shot = SCREENSHOTS.get(page)
            report = browser.load(base + page, screenshot=ARTIFACTS / shot if shot else None,
                                  full_page=page.startswith(FULL_PAGE))
            if report.problems:
                problems[page] = report.problems
            if re.fullmatch(r"reports/\d\d_\w+\.html", page):
                reports[page] = report
    assert problems == {}
    assert len(reports) >= 7
    for page, report in reports.items():
        assert report.visible_outputs + report.visible_images >= 1, f"{page} shows no output"
    for page in ("reports/01_ingest.html", "reports/05_evaluate.html", "reports/07_monitor.html"):
        assert reports[page].visible_images >= 1, f"{page} shows no plot"
    for name in SCREENSHOTS.values():
        assert (ARTIFACTS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkers_catch_a_broken_page(site, browser, tmp_path):
    "The checks can fail: a broken image, a bad link, a script error, a foreign request, wide code, a spilling table."
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    home = broken / "index.html"
    home.write_text(home.read_text(encoding="utf-8").replace(
        "</body>", '<img src="missing.png"><a href="nowhere.html">x</a>'
                   '<img src="http://127.0.0.2:9/elsewhere.png">'
                   "<script>console.error('injected error'); undefinedFunction();</script></body>").replace(
        "</article>", '<pre><code style="white-space: pre">' + "a_very_long_line = 1; " * 40 + "</code></pre>"
                      '<table class="injected" style="width: 3000px"><tr><td>spilling table</td></tr></table></article>'),
        encoding="utf-8")
    assert sorted(broken_links(broken)) == ["index.html -> missing.png", "index.html -> nowhere.html"]
    with serve(broken) as base:
        report = browser.load(base + "index.html")
        report_page = browser.load(base + "reports/07_monitor.html")
    assert any("injected error" in text for text in report.console_errors)
    assert any("undefinedFunction" in text for text in report.console_errors)
    assert any(url.endswith("/missing.png") for url in report.broken_images)
    assert any(text.startswith("404 ") and text.endswith("/missing.png") for text in report.failed_requests)
    assert report.foreign_requests == ["http://127.0.0.2:9/elsewhere.png"]
    assert [line[:16] for line in report.wide_code] == ["a_very_long_line"]
    assert report.spilling_tables == ["spilling table"]
    assert report_page.visible_outputs >= 1 and report_page.problems == []


def test_not_found_page_works_under_a_subpath(site, browser, tmp_path):
    "404.html links its assets relatively, so it loads under a subpath (a GitHub Pages project site)."
    page = _html(site, "404.html")
    assert not re.search(r'(href|src)="/(?!/)', page)
    (tmp_path / "project").mkdir()
    shutil.copytree(site, tmp_path / "project" / "docs")
    with serve(tmp_path / "project") as base:
        report = browser.load(base + "docs/404.html")
    assert report.problems == []


def test_dvc_plots_need_nothing_from_the_internet(repro_project, tmp_path):
    "`dvc plots show` draws the PNG plots alone: its page loads no script from a CDN; its output folder is ignored."
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    dvc(project, "plots", "show", "--out", "dvc_plots")
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert len(re.findall(r"<img", page)) >= 3
    assert "dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()


def test_guides_are_titled_apart(site):
    titles = [re.search(r"<h1[^>]*>(.*?)<", _html(site, f"{guide.stem}.html")).group(1)
              for guide in sorted((REPO / "docs").glob("*.md"))]
    beginnings = [" ".join(title.split()[:4]) for title in titles]
    assert len(set(beginnings)) == len(beginnings), titles


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
