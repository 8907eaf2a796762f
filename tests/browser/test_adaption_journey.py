"""In the browser: meta-train a tiny super-net, request an adapted model for this server's CPU, watch the
Pareto chart fill, download the TorchScript file and classify an image with plain torch.jit.load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model

from devices.services import seed_builtin_devices
from tests.browser.conftest import login, screenshot

# Longer than the suite's 300 s per test: its inner waits allow a loaded CI machine 4 minutes a job.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

CLASSIFY = r"""
import json, sys, torch
from PIL import Image
import numpy as np
model = torch.jit.load(sys.argv[1]).eval()
image = Image.new("L", (28, 28), 0)
for i in range(6, 22):
    image.putpixel((i, i), 255)  # a drawn stroke, as Omniglot (inverted: bright strokes)
x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
with torch.no_grad():
    logits = model(x)
print(json.dumps({"shape": list(logits.shape), "label": int(logits.argmax()), "engine": "engine" in sys.modules}))
"""


def test_metatrain_adapt_watch_the_front_and_download(daphne_server, browser_page, tmp_path):
    seed_builtin_devices()
    get_user_model().objects.create_user("deployer", password="deployer-pw-123")
    page = browser_page
    login(page, daphne_server, "deployer", "deployer-pw-123")

    page.click("text=Meta-training")
    page.fill("input[name=ways]", "5")
    page.select_option("select[name=preset]", "tiny")
    page.click("#start-metatrain")
    page.wait_for_selector("html[data-live-sockets]")
    page.wait_for_selector(".progress[data-status=succeeded]", timeout=240_000)
    page.wait_for_selector("#test-accuracy", timeout=30_000)  # reloaded with the summary
    page.wait_for_selector("#training-chart .main-svg")
    screenshot(page, "metatraining")

    page.click("text=Request an adapted model")
    page.select_option("select[name=device]", label="This server's CPU")
    page.select_option("select[name=constraint]", "params")
    page.fill("input[name=budgets]", "3000, 8000")
    page.click("#start-adaption")
    page.wait_for_selector("#pareto-chart")
    page.wait_for_selector(".progress[data-status=succeeded]", timeout=240_000)
    page.wait_for_selector("#models .download-torchscript", timeout=30_000)
    page.wait_for_selector("#pareto-chart .main-svg")
    points = page.evaluate("document.getElementById('pareto-chart').data.map(t => (t.x || []).length)")
    assert points[0] > 0 and points[1] > 0  # population and front are drawn
    # The x axis spans the search (budgets up to 8,000 params), not the ~113k-parameter MAML++
    # reference, which is named at the right edge instead of squeezing the front into a sliver.
    chart = page.evaluate(
        "(() => { const l = document.getElementById('pareto-chart').layout;"
        " return {range: l.xaxis.range, notes: (l.annotations || []).map(a => a.text)}; })()"
    )
    assert chart["range"][1] <= 1.08 * 8000 + 1, chart
    assert any(note.startswith("MAML++ 4-conv") and note.endswith("params →") for note in chart["notes"]), (
        chart
    )
    assert page.locator("#models .latency-measured").count() == 2  # this server is the device
    # Each model against random search with as many evaluations, paired on the same test tasks.
    assert page.locator("#models .against-random .ga-minus-random").count() == 2
    assert page.locator("#models .against-random .random-choice").count() == 2
    assert " points" in page.inner_text("#models .ga-minus-random >> nth=0")
    screenshot(page, "adaption")
    assert page.js_errors == []

    with page.expect_download() as download_info:
        page.click("#models .download-torchscript >> nth=0")
    path = tmp_path / "model.pt"
    download_info.value.save_as(path)
    result = subprocess.run(
        [sys.executable, "-c", CLASSIFY, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["shape"] == [1, 5] and 0 <= answer["label"] < 5 and answer["engine"] is False

    # The same super-net adapted for a second device, then both fronts on the compare page.
    page.goto(f"{daphne_server}/runs/adapt/")
    page.select_option("select[name=device]", label="Eyeriss (simulated, scalesim 12x14)")
    page.select_option("select[name=constraint]", "params")
    page.fill("input[name=budgets]", "3000, 8000")
    page.click("#start-adaption")
    page.wait_for_selector(".progress[data-status=succeeded]", timeout=240_000)
    # The page reloads itself 1.5 s after success; navigating before that could be cut off by it.
    page.wait_for_selector("#models .download-torchscript", timeout=30_000)
    page.goto(f"{daphne_server}/runs/adapt/")
    page.click("text=Compare devices")
    page.wait_for_selector("#compare-chart .main-svg")
    names = page.evaluate("document.getElementById('compare-chart').data.map(t => t.name)")
    assert len(names) == 2 and any("CPU" in n for n in names) and any("Eyeriss" in n for n in names), names
    # Both runs searched under params budgets, so their fronts coincide: each keeps its own dash.
    dashes = page.evaluate("document.getElementById('compare-chart').data.map(t => t.line.dash)")
    assert len(set(dashes)) == 2, dashes
    screenshot(page, "compare-devices")
    assert page.js_errors == []
