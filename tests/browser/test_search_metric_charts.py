"""In the browser: the Pareto and compare charts name what each search minimised - a mean query
loss or a query error rate - and a queued run's chart follows what its worker streams."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from devices.models import Device
from devices.services import seed_builtin_devices
from nasweb.core.models import JobStatus
from nasweb.core.progress import broadcast
from nasweb.runs.models import AdaptionRun, MetaTrainingRun, Method
from tests.browser.conftest import login

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

LAYOUT = "(() => { const l = document.getElementById('%s').layout; return {title: l.title.text, y: l.yaxis.title.text, y2: l.yaxis2 ? l.yaxis2.title.text : null}; })()"  # noqa: E501
TRACES = "document.getElementById('%s').data.map(t => ({name: t.name, yaxis: t.yaxis || 'y', n: (t.x || []).length}))"


def test_charts_name_the_metric_each_search_minimised(daphne_server, browser_page):
    seed_builtin_devices()
    user = get_user_model().objects.create_user("metrics", password="metrics-pw-123")
    supernet = MetaTrainingRun.objects.create(
        owner=user, method=Method.HMETANAS, ways=5, preset="tiny", spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": 5, "in_channels": 1, "image_size": 28}, summary={},
    )  # fmt: skip
    cpu = Device.objects.get(builtin_key="local-cpu")

    def adaption(**fields):
        return AdaptionRun.objects.create(
            owner=user, supernet=supernet, device=cpu, constraint="params", budgets=[6000.0], **fields
        )

    def front(*points):
        return [{"costs": {"params": params}, "loss": loss, "arch": "d1"} for params, loss in points]

    done = dict(status=JobStatus.SUCCEEDED, finished_at=timezone.now())
    by_error = adaption(preset="cpu", **done, result={"search_metric": "accuracy", "front": front((2000, 0.62), (5000, 0.55)),
                                                     "outcomes": [], "baselines": []})  # fmt: skip
    by_loss = adaption(
        preset="tiny", **done, result={"front": front((2500, 1.9)), "outcomes": [], "baselines": []}
    )
    queued = adaption(preset="cpu", status=JobStatus.QUEUED)

    page = browser_page
    login(page, daphne_server, "metrics", "metrics-pw-123")

    page.goto(f"{daphne_server}/runs/adapt/{by_error.pk}/")
    page.wait_for_selector("#pareto-chart .main-svg")
    chart = page.evaluate(LAYOUT % "pareto-chart")
    assert chart["y"] == "query error rate (lower is better)" and "few-shot error rate" in chart["title"], (
        chart
    )
    assert page.inner_text("#search-metric") == "query error rate"

    page.goto(f"{daphne_server}/runs/adapt/{by_loss.pk}/")
    page.wait_for_selector("#pareto-chart .main-svg")
    chart = page.evaluate(LAYOUT % "pareto-chart")
    assert chart["y"] == "mean query loss (lower is better)" and "few-shot loss" in chart["title"], chart

    # Fronts of both metrics on one page: the error rates get their own axis, the legend says which.
    page.goto(f"{daphne_server}/runs/compare/?supernet={supernet.pk}")
    page.wait_for_selector("#compare-chart .main-svg")
    chart = page.evaluate(LAYOUT % "compare-chart")
    assert chart["y"] == "mean query loss (lower is better)", chart
    assert chart["y2"] == "query error rate (lower is better)", chart
    traces = {t["name"]: t for t in page.evaluate(TRACES % "compare-chart")}
    assert traces[f"This server's CPU (params, run {by_error.pk}, error rate)"] == {
        "name": f"This server's CPU (params, run {by_error.pk}, error rate)",
        "yaxis": "y2",
        "n": 2,
    }
    assert traces[f"This server's CPU (params, run {by_loss.pk}, loss)"]["yaxis"] == "y"

    # A queued `cpu` run is drawn for the error rate; its worker's events say what it searches on.
    page.goto(f"{daphne_server}/runs/adapt/{queued.pk}/")
    page.wait_for_selector("#pareto-chart .main-svg")
    page.wait_for_selector("html[data-live-sockets]")
    assert page.evaluate(LAYOUT % "pareto-chart")["y"] == "query error rate (lower is better)"
    generation = {
        "kind": "adapt", "metric": "loss", "current": 1, "total": 40,
        "population": [{"costs": {"params": 3000}, "fitness": 1.93}, {"costs": {"params": 4000}, "fitness": 1.88}],
        "front": [{"costs": {"params": 3000}, "loss": 1.93, "arch": "d1"}],
    }  # fmt: skip
    # From another thread: Playwright's sync API keeps an event loop in this one.
    sender = threading.Thread(target=broadcast, args=(queued.group_name, "job.progress", generation))
    sender.start()
    sender.join(timeout=30)
    page.wait_for_selector("#pareto-chart[data-metric='loss']")
    chart = page.evaluate(LAYOUT % "pareto-chart")
    assert chart["y"] == "mean query loss (lower is better)" and "few-shot loss" in chart["title"], chart
    assert page.evaluate(TRACES % "pareto-chart")[0]["n"] == 2  # the streamed population is drawn
    assert page.js_errors == []
