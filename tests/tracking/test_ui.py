"""The MLflow UI as a user meets it: a tiny real sweep (2 variants x 1 seed, Ray Tune over Ray Train) logs to
a real `byol-ray mlflow-server`, then Debian's chromium, headless and driven by Playwright, opens the pages a
user would and reads them back against what the MLflow API holds:

- the experiment page lists the sweep's parent run with its trials nested under it, named by variant and seed;
- the compare view of the trials shows the swept param, and a scatter plot of it against linear top-1;
- a trial's page charts its per-epoch loss, and its system metrics (CPU, memory);
- the parent run's artifacts hold the report table.

Screenshots of every page go to the test's temporary folder (printed). With BYOL_UI_SCREENSHOTS=<folder>
(`make screenshots`: docs/img) the README's screenshots are copied there too.

Notes on MLflow 3.17.2's UI: it opens an experiment in its GenAI view unless the URL (?workflowType=
machine_learning, as in the URL `byol-ray mlflow-server` prints) or the browser's saved choice asks for the
model-training one. The experiment page is opened at the printed URL by a first-time visitor; the other
pages by a user who has clicked "Model training" once. The assistant panel that opens on a first visit is
marked as closed in the browser's storage.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from conftest import FMNIST_ROOT, write_sweep

from byol_ray.sweep_spec import load_sweep
from byol_ray.tracking.server import MlflowServer, experiment_page

pytestmark = pytest.mark.ray

CHROMIUM = os.environ.get("BYOL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
README_SHOTS = os.environ.get("BYOL_UI_SCREENSHOTS", "")
SWEEP = "ui"
VARIANTS = [
    {"name": f"tau={tau}", "set": {"optim.tau_base": tau, "optim.tau_schedule": "constant"}} for tau in (0.9, 0.99)
]
SWEPT = "optim.tau_base"
LINEAR = "eval/byol/linear_top1"
SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")
# Waits for pages (a loaded 2-core machine, a server on SQLite) are long; what they show is checked exactly.
WAIT_MS = 60_000
# The browser's saved choices (MLflow's useLocalStorage keys, "<key>_v<version>"). Every tab: the assistant
# panel, which otherwise opens over a third of the page on a first visit, was closed. A returning user's
# tab: "Model training" was clicked once (the URL's ?workflowType is not remembered: a run's page opened
# by its own URL would show the GenAI menu).
SEEN_ASSISTANT = """try {
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}"""
CHOSE_MODEL_TRAINING = (
    "try { localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning')); } catch (e) {}"
)
CHART_CARD = '[data-testid="experiment-view-compare-runs-card"]'  # one metric chart on a run's page


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The sweep, run to the end against a real MLflow server; what the API says of it."""
    import ray

    from byol_ray.distributed.sweep import run_sweep

    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed under {FMNIST_ROOT} (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("ui")
    server = MlflowServer(f"sqlite:///{d}/mlflow.db", str(d / "artifacts"), log_path=d / "server.log").start()
    try:
        spec = load_sweep(str(write_sweep(d, VARIANTS, seeds=1, name=SWEEP, fmnist_root=str(FMNIST_ROOT))))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            run_sweep(spec, [f"tracking.tracking_uri={server.url}", "tracking.system_metrics_interval_s=1"])
        finally:
            ray.shutdown()
        client = mlflow.MlflowClient(server.url)
        exp = client.get_experiment_by_name("byol-ray")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("byol_ray.role") == "sweep"]
        children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        shots = d / "screenshots"
        shots.mkdir()
        print(f"\n[test_ui] screenshots in {shots}")
        yield {
            "server": server,
            "client": client,
            "experiment": exp,
            "parent": parent,
            "children": children,
            "shots": shots,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(store):
    """Headless chromium; started after the server and closed before it stops (its open connections
    would otherwise hold the server's shutdown up)."""
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no chromium at {CHROMIUM}: scripts/setup.sh installs Debian's chromium (or point BYOL_CHROMIUM at one)"
        )
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        yield b
        b.close()


@contextlib.contextmanager
def browser_tab(browser, store, request, *init_scripts: str) -> Iterator:
    """A fresh browser tab (its own storage); what it showed when its test failed is kept as FAILED_<test>.png."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    for script in init_scripts:
        ctx.add_init_script(script)
    ctx.set_default_timeout(WAIT_MS)
    pg = ctx.new_page()
    failed_before = request.session.testsfailed
    try:
        yield pg
    finally:
        if request.session.testsfailed > failed_before:  # the test's failure is counted before teardown
            pg.screenshot(path=str(store["shots"] / f"FAILED_{request.node.name}.png"))
        ctx.close()


@pytest.fixture
def first_visit(browser, store, request):
    """A user's first visit: nothing chosen in the UI yet."""
    with browser_tab(browser, store, request, SEEN_ASSISTANT) as pg:
        yield pg


@pytest.fixture
def page(browser, store, request):
    """A returning user, who has clicked "Model training" once."""
    with browser_tab(browser, store, request, SEEN_ASSISTANT, CHOSE_MODEL_TRAINING) as pg:
        yield pg


def screenshot(page, store, name: str, readme: bool = False) -> None:
    """A screenshot into the test's folder; with BYOL_UI_SCREENSHOTS, the README's copy too."""
    path = store["shots"] / f"{name}.png"
    page.mouse.move(0, 0)  # no chart toolbar or tooltip left open by the last click
    page.screenshot(path=str(path))
    if readme and README_SHOTS:
        Path(README_SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(README_SHOTS) / f"mlflow_{name}.png")


def trial_names() -> list[str]:
    """The names the trials must show: variant and seed."""
    return [f"{v['name']} seed 0" for v in VARIANTS]


def open_runs_table(page, store):
    """The experiment's runs table, at the URL `byol-ray mlflow-server` prints, with the sweep expanded."""
    url = experiment_page(store["server"].url, "byol-ray")
    assert url.endswith(f"/#/experiments/{store['experiment'].experiment_id}/runs?workflowType=machine_learning")
    page.goto(url)
    parent = page.get_by_role("link", name=f"sweep-{SWEEP}", exact=True)
    parent.wait_for()
    row = page.locator(f'[role="row"][row-id="{store["parent"].info.run_id}"]').filter(has=parent)
    first = page.get_by_role("link", name=trial_names()[0], exact=True)
    if not first.count():  # collapsed (the default): the [+] in the parent's name cell shows its trials
        row.locator('[role="gridcell"][col-id*="Run Name"] button').click()
    return parent, row


def test_experiment_page_lists_the_parent_with_its_trials_nested(first_visit, store):
    from playwright.sync_api import expect

    page = first_visit  # the printed URL alone opens the runs table
    parent, row = open_runs_table(page, store)
    parent_index = int(row.get_attribute("aria-rowindex"))
    parent_x = parent.bounding_box()["x"]
    for name in trial_names():
        link = page.get_by_role("link", name=name, exact=True)
        expect(link).to_be_visible()
        child = page.locator('[role="row"][row-id]').filter(has=link)
        assert int(child.get_attribute("aria-rowindex")) > parent_index, f"{name!r} is not listed under the parent"
        assert link.bounding_box()["x"] > parent_x + 10, f"{name!r} is not indented under the parent"
        assert child.get_attribute("row-id") == store["children"][name].info.run_id
    screenshot(page, store, "experiment", readme=True)
    assert sorted(store["children"]) == sorted(trial_names())
    assert store["experiment"].tags.get("mlflow.experimentKind") == "custom_model_development"


def test_compare_view_shows_the_swept_param_against_linear_top1(page, store):
    from playwright.sync_api import expect

    open_runs_table(page, store)
    for name in trial_names():
        link = page.get_by_role("link", name=name, exact=True)
        page.locator('[role="row"][row-id]').filter(has=link).get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_url("**/#/compare-runs?runs=*")
    expect(page.get_by_text(f"Comparing {len(VARIANTS)} Runs from 1 Experiment")).to_be_visible()
    # The params table: the swept key, one column per trial.
    swept = {name: store["children"][name].data.params[SWEPT] for name in trial_names()}
    assert sorted(swept.values()) == ["0.9", "0.99"]
    params_row = page.get_by_role("row").filter(has_text=SWEPT)
    for value in swept.values():
        params_row = params_row.filter(has_text=value)
    expect(params_row.first).to_be_visible()
    # The scatter plot: the swept param (x) against linear top-1 (y), one point per trial.
    page.get_by_role("tab", name="Scatter Plot").click()
    page.locator("#x-axis-selector").click()
    page.get_by_role("option", name=SWEPT, exact=True).click()
    page.locator("#y-axis-selector").click()
    page.get_by_role("option", name=LINEAR, exact=True).click()
    expect(page.locator("#y-axis-selector")).to_have_text(LINEAR)
    plot = page.get_by_role("tabpanel", name="Scatter Plot").locator(".js-plotly-plot")
    expect(plot).to_contain_text(LINEAR)  # the axis titles
    expect(plot).to_contain_text(SWEPT)
    (trace,) = plot_traces(plot)  # one trace, a point per run
    points = sorted(zip(map(float, trace["x"]), trace["y"]))
    expected = sorted((float(swept[n]), store["children"][n].data.metrics[LINEAR]) for n in trial_names())
    assert [x for p in points for x in p] == pytest.approx([x for p in expected for x in p]), (points, expected)
    for name in trial_names():  # each point's hover text names its trial
        assert any(name in text for text in trace["text"]), (name, trace["text"])
    screenshot(page, store, "compare", readme=True)


def test_trial_page_charts_the_loss_per_epoch(page, store):
    name = trial_names()[0]
    run = open_run(page, store, name, "model-metrics")
    screenshot(page, store, "trial_metrics")
    card, trace = chart(page, name, "loss")
    history = sorted(store["client"].get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    epochs = int(run.data.params["optim.epochs"])
    assert [m.step for m in history] == list(range(1, epochs + 1))  # one point per epoch
    assert list(trace["x"]) == [m.step for m in history]
    assert trace["y"] == pytest.approx([m.value for m in history])
    card.screenshot(path=str(store["shots"] / "trial_loss_chart.png"))


def test_trial_page_charts_system_metrics(page, store):
    name = trial_names()[0]
    run = open_run(page, store, name, "system-metrics")
    screenshot(page, store, "system_metrics", readme=True)
    for key in SYSTEM:
        _, trace = chart(page, name, key)
        history = sorted(store["client"].get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert len(history) >= 2, f"{key}: {len(history)} samples at 1 s intervals"
        assert trace["y"] == pytest.approx([m.value for m in history])


def test_parent_artifacts_hold_the_report_table(page, store):
    from playwright.sync_api import expect

    open_run(page, store, f"sweep-{SWEEP}", "artifacts")
    table_file = page.get_by_text(f"{SWEEP}_table.md", exact=True)
    table_file.wait_for()
    for other in (f"{SWEEP}_table.csv", f"{SWEEP}_table.png"):
        expect(page.get_by_text(other, exact=True)).to_be_visible()
    table_file.click()
    table = page.get_by_role("table")  # the Markdown file, rendered
    expect(table).to_contain_text("linear top-1")
    for v in VARIANTS:
        expect(table).to_contain_text(v["name"])
    screenshot(page, store, "report_artifact")


# ---- reading pages -------------------------------------------------------------------------------------
def open_run(page, store, name: str, tab: str):
    """The page of run `name`, reached as a user would (its link in the runs table), on one of its tabs
    (model-metrics, system-metrics: once its charts are drawn; artifacts). Returns the run, from the API."""
    from playwright.sync_api import expect

    open_runs_table(page, store)
    page.get_by_role("link", name=name, exact=True).click()
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f]{32}"))
    run = store["client"].get_run(re.search(r"/runs/([0-9a-f]{32})", page.url).group(1))
    page.goto(f"{store['server'].url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/{tab}")
    expect(page.get_by_role("heading", name=name)).to_be_visible()
    if tab.endswith("metrics"):
        page.locator(CHART_CARD).first.locator(".js-plotly-plot").wait_for()
    return run


def chart(page, run_name: str, key: str):
    """The chart card of metric `key` on a run's page, and its one line. Cards below the fold are not drawn
    (a virtualised grid), so the page's chart search narrows the grid to this metric first."""
    from playwright.sync_api import expect

    page.get_by_placeholder("Search metric charts").fill(key)
    card = page.locator(CHART_CARD).filter(has=page.locator(f'h4[title="{key}"]'))
    card.wait_for()
    card.scroll_into_view_if_needed()
    expect(card).to_contain_text(f"{run_name} ({key})")  # the legend: this run's line
    traces = plot_traces(card.locator(".js-plotly-plot"))
    # The run's line is drawn twice (markers, and the line under them), both from the same points.
    assert traces and all(t["name"] == run_name and t["y"] == traces[0]["y"] for t in traces), traces
    return card, traces[0]


def plot_traces(plot) -> list[dict]:
    """The data Plotly draws (x, y and hover text of each trace), read from the chart's element."""
    plot.wait_for(state="attached")  # Plotly's root element has no size of its own: never "visible"
    return plot.evaluate(
        "e => e.data.map(t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []), "
        "text: Array.isArray(t.text) ? t.text : [t.text]}))"
    )
