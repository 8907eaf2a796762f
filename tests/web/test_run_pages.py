"""Run pages and API: the login/owner/staff boundary, form and API validation, downloads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs import services
from nasweb.runs.models import MAX_DEPTH_ELITES, AdaptedModel, AdaptionRun, MetaTrainingRun, Method

pytestmark = pytest.mark.django_db


@pytest.fixture
def users():
    model = get_user_model()
    return {
        "owner": model.objects.create_user("owner", password="pw-owner-123"),
        "other": model.objects.create_user("other", password="pw-other-123"),
        "staff": model.objects.create_user("staff", password="pw-staff-123", is_staff=True),
    }


@pytest.fixture
def runs(users, tmp_path):
    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    supernet = MetaTrainingRun.objects.create(
        owner=users["owner"], method=Method.HMETANAS, ways=5, preset="tiny", spec={}, status=JobStatus.SUCCEEDED,
        space={"num_classes": 5, "in_channels": 1, "image_size": 28}, summary={"test": {"mean": 0.5, "ci95": 0.02, "tasks": 60}},
        history=[{"current": 1, "total": 2, "loss": 1.5, "accuracy": 0.3}],
    )  # fmt: skip
    adaption = AdaptionRun.objects.create(
        owner=users["owner"], supernet=supernet, device=cpu, constraint="params", budgets=[3000.0], status=JobStatus.SUCCEEDED,
        result={"front": [], "baselines": [{"name": "MAML++ 4-conv", "params": 113236, "macs": 9816320, "latency_ms_lut": None}], "outcomes": []},
    )  # fmt: skip
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"torchscript-bytes")
    card = tmp_path / "model_card.json"
    card.write_text('{"params": 2000}')
    model = AdaptedModel.objects.create(
        run=adaption,
        budget=3000,
        arch={},
        card={"params": 2000, "arch_code": "d1"},
        torchscript=str(model_file),
        card_path=str(card),
    )
    return supernet, adaption, model


PAGES = [
    "/runs/train/", "/runs/adapt/", "/runs/compare/",
    "/runs/train/{s}/", "/runs/train/{s}.json", "/runs/adapt/{a}/", "/runs/adapt/{a}.json",
    "/runs/compare/{s}.json", "/models/{m}/torchscript", "/models/{m}/card",
]  # fmt: skip
PRIVATE = {
    "/runs/train/{s}/",
    "/runs/train/{s}.json",
    "/runs/adapt/{a}/",
    "/runs/adapt/{a}.json",
    "/runs/compare/{s}.json",
    "/models/{m}/torchscript",
    "/models/{m}/card",
}


@pytest.mark.parametrize("page", PAGES)
def test_pages_need_login_and_belong_to_their_owner(client, users, runs, page):
    supernet, adaption, model = runs
    url = page.format(s=supernet.pk, a=adaption.pk, m=model.pk)
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    for name, expected in [("owner", 200), ("staff", 200), ("other", 404 if page in PRIVATE else 200)]:
        client.force_login(users[name])
        assert client.get(url).status_code == expected, (name, url)


def test_the_json_feeds_the_charts(client, users, runs):
    supernet, adaption, model = runs
    client.force_login(users["owner"])
    training = client.get(f"/runs/train/{supernet.pk}.json").json()
    assert training["history"][0]["loss"] == 1.5
    payload = client.get(f"/runs/adapt/{adaption.pk}.json").json()
    assert payload["baselines"][0]["costs"]["params"] == 113236
    assert payload["models"][0]["id"] == model.pk
    download = client.get(f"/models/{model.pk}/torchscript")
    assert b"".join(download.streaming_content) == b"torchscript-bytes"
    assert "attachment" in download["Content-Disposition"]
    assert client.get(f"/models/{model.pk}/onnx").status_code == 404  # this one has no ONNX file
    assert client.get(f"/models/{model.pk}/secrets").status_code == 404


@pytest.mark.parametrize(
    "budgets, message",
    [
        ("", "give at least one budget"),
        ("abc", "budgets must be numbers"),
        ("0, 2", "finite and positive"),
        ("-1", "finite and positive"),
    ],
)
def test_the_adaption_form_rejects_bad_budgets(client, users, runs, budgets, message):
    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu = Device.objects.get(builtin_key="local-cpu")
    before = AdaptionRun.objects.count()
    response = client.post(
        "/runs/adapt/",
        {
            "supernet": supernet.pk,
            "device": cpu.pk,
            "constraint": "params",
            "budgets": budgets,
            "preset": "tiny",
        },
    )
    assert response.status_code == 400
    assert message in response.content.decode()
    assert AdaptionRun.objects.count() == before


def _zip(classes: int, images: int = 2) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for c in range(classes):
            for i in range(images):
                image = io.BytesIO()
                Image.new("L", (28, 28), color=40 * c + i).save(image, format="PNG")
                archive.writestr(f"class_{c}/img_{i}.png", image.getvalue())
    return buffer.getvalue()


def test_a_support_set_with_the_wrong_class_count_is_refused(client, users, runs):
    from django.core.files.uploadedfile import SimpleUploadedFile

    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu = Device.objects.get(builtin_key="local-cpu")
    before = AdaptionRun.objects.count()
    upload = SimpleUploadedFile("three.zip", _zip(3), content_type="application/zip")
    response = client.post(
        "/runs/adapt/",
        {
            "supernet": supernet.pk,
            "device": cpu.pk,
            "constraint": "params",
            "budgets": "3000",
            "preset": "tiny",
            "support_zip": upload,
        },
    )
    assert "has 3 classes but the super-net is 5-way" in response.content.decode()
    assert AdaptionRun.objects.count() == before
    not_a_zip = SimpleUploadedFile("x.zip", b"not a zip at all", content_type="application/zip")
    response = client.post(
        "/runs/adapt/",
        {
            "supernet": supernet.pk,
            "device": cpu.pk,
            "constraint": "params",
            "budgets": "3000",
            "preset": "tiny",
            "support_zip": not_a_zip,
        },
    )
    assert "not a zip file" in response.content.decode()


def _adaption_form_fields(supernet, preset: str) -> tuple[Device, dict]:
    """The local CPU and a valid adaption form for ``supernet`` with a params budget."""
    cpu = Device.objects.get(builtin_key="local-cpu")
    fields = {
        "supernet": supernet.pk,
        "device": cpu.pk,
        "constraint": "params",
        "budgets": "3000",
        "preset": preset,
    }
    return cpu, fields


def _owner_api(users) -> APIClient:
    api = APIClient()
    api.force_authenticate(users["owner"])
    return api


def _api_adaption_body(supernet, cpu: Device) -> dict:
    """A valid adaption request of the API for ``supernet`` on ``cpu``: a params budget, cpu preset."""
    return {
        "supernet": supernet.pk,
        "device": cpu.pk,
        "constraint": "params",
        "budgets": [3000],
        "preset": "cpu",
    }


def _posted_run(client, fields: dict, **options) -> tuple[AdaptionRun, str]:
    """Post the adaption form with ``options``: the run it queued and the text of its page."""
    assert client.post("/runs/adapt/", {**fields, **options}).status_code == 302
    run = AdaptionRun.objects.latest("pk")
    return run, client.get(run.get_absolute_url()).content.decode()


def _finished_metanas_run(owner) -> MetaTrainingRun:
    return MetaTrainingRun.objects.create(
        owner=owner, method=Method.METANAS, ways=5, preset="tiny", spec={}, status=JobStatus.SUCCEEDED
    )


def test_patience_goes_from_the_form_and_the_api_to_the_run(client, users, runs):
    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu, fields = _adaption_form_fields(supernet, "tiny")
    response = client.post("/runs/adapt/", {**fields, "patience": "15"})
    assert response.status_code == 302
    run = AdaptionRun.objects.latest("pk")
    assert run.patience == 15
    assert "stood still 15 generations" in client.get(run.get_absolute_url()).content.decode()
    assert client.post("/runs/adapt/", {**fields, "patience": ""}).status_code == 302
    assert AdaptionRun.objects.latest("pk").patience == 0  # blank: every generation
    before = AdaptionRun.objects.count()
    for bad in ("-1", "1001", "ten"):
        refused = client.post("/runs/adapt/", {**fields, "patience": bad})
        assert refused.status_code == 400 and "patience" in refused.content.decode()
    assert AdaptionRun.objects.count() == before

    api = APIClient()
    api.force_authenticate(users["owner"])
    body = {"supernet": supernet.pk, "device": cpu.pk, "constraint": "params", "budgets": [3000]}
    created = api.post("/api/runs/adapt/", {**body, "patience": 5}, format="json")
    assert created.status_code == 201 and created.json()["patience"] == 5
    assert AdaptionRun.objects.get(pk=created.json()["id"]).patience == 5
    assert api.post("/api/runs/adapt/", body, format="json").json()["patience"] == 0
    refused = api.post("/api/runs/adapt/", {**body, "patience": -2}, format="json")
    assert refused.status_code == 400 and "patience" in str(refused.json())

    # A MetaNAS run searches no architectures per budget: nothing for patience to stop.
    metanas = _finished_metanas_run(users["owner"])
    refused = api.post("/api/runs/adapt/", {**body, "supernet": metanas.pk, "patience": 5}, format="json")
    assert refused.status_code == 400 and "MetaNAS" in refused.json()["error"]


def test_search_metric_and_deepen_go_from_the_form_and_the_api_to_the_run(client, users, runs):
    """Both override the preset's; blank keeps it. The run page says what was chosen."""
    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu, fields = _adaption_form_fields(supernet, "cpu")
    form_page = client.get("/runs/adapt/").content.decode()
    assert 'name="search_metric"' in form_page and 'name="deepen"' in form_page

    response = client.post("/runs/adapt/", {**fields, "search_metric": "loss", "deepen": "copy-last"})
    assert response.status_code == 302
    run = AdaptionRun.objects.latest("pk")
    assert (run.search_metric, run.deepen) == ("loss", "copy-last")
    page = client.get(run.get_absolute_url()).content.decode()
    assert '<span id="search-metric">query loss</span>' in page  # not the cpu preset's error rate
    assert "layers a mutation adds copy the last layer" in page
    assert client.post("/runs/adapt/", fields).status_code == 302
    blank = AdaptionRun.objects.latest("pk")
    assert (blank.search_metric, blank.deepen) == ("", "")  # the preset's
    assert client.get(f"/runs/adapt/{blank.pk}.json").json()["search_metric"] == "accuracy"
    before = AdaptionRun.objects.count()
    for bad in ({"search_metric": "speed"}, {"deepen": "grow"}):
        refused = client.post("/runs/adapt/", {**fields, **bad})
        assert refused.status_code == 400 and "Select a valid choice" in refused.content.decode()
    assert AdaptionRun.objects.count() == before

    api, body = _owner_api(users), _api_adaption_body(supernet, cpu)
    created = api.post(
        "/api/runs/adapt/", {**body, "search_metric": "accuracy", "deepen": "stored"}, format="json"
    )
    assert created.status_code == 201
    assert (created.json()["search_metric"], created.json()["deepen"]) == ("accuracy", "stored")
    assert AdaptionRun.objects.get(pk=created.json()["id"]).search_metric == "accuracy"
    defaults = api.post("/api/runs/adapt/", body, format="json").json()
    assert (defaults["search_metric"], defaults["deepen"]) == ("", "")
    for bad in ({"search_metric": "speed"}, {"deepen": 3}):
        refused = api.post("/api/runs/adapt/", {**body, **bad}, format="json")
        assert refused.status_code == 400 and next(iter(bad)) in str(refused.json())

    # A MetaNAS run has no architecture search for either to steer.
    metanas = _finished_metanas_run(users["owner"])
    for steer in ({"search_metric": "loss"}, {"deepen": "copy-last"}):
        refused = api.post("/api/runs/adapt/", {**body, "supernet": metanas.pk, **steer}, format="json")
        assert refused.status_code == 400 and "MetaNAS" in refused.json()["error"]
    with pytest.raises(services.RunInputError, match="search_metric must be one of"):
        services.adaption_start(owner=users["owner"], supernet=supernet, device=cpu, constraint="params",
                                budgets=[3000.0], search_metric="speed")  # fmt: skip


def test_search_precision_goes_from_the_form_and_the_api_to_the_run(
    client, users, runs, settings, monkeypatch
):
    """bfloat16 overrides the preset's float32; blank keeps it; the run page says so; a server
    that searches on its GPU or whose CPU lacks bfloat16 instructions, and a MetaNAS run, refuse it."""
    from engine import cpu as cpu_features

    # The CPU's flags are the machine's: pinned here, so that both answers are tested anywhere.
    monkeypatch.setattr(cpu_features, "bfloat16_flags", lambda: ["avx512_bf16"])
    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu, fields = _adaption_form_fields(supernet, "cpu")
    assert 'name="search_precision"' in client.get("/runs/adapt/").content.decode()
    run, page = _posted_run(client, fields, search_precision="bfloat16")
    assert run.search_precision == "bfloat16" and "scored in bfloat16" in page
    blank, page = _posted_run(client, fields)
    assert blank.search_precision == "" and "scored in bfloat16" not in page
    refused = client.post("/runs/adapt/", {**fields, "search_precision": "float16"})
    assert refused.status_code == 400 and "Select a valid choice" in refused.content.decode()

    api, body = _owner_api(users), _api_adaption_body(supernet, cpu)
    created = api.post("/api/runs/adapt/", {**body, "search_precision": "bfloat16"}, format="json")
    assert created.status_code == 201 and created.json()["search_precision"] == "bfloat16"
    assert api.post("/api/runs/adapt/", body, format="json").json()["search_precision"] == ""
    refused = api.post("/api/runs/adapt/", {**body, "search_precision": "int8"}, format="json")
    assert refused.status_code == 400 and "search_precision" in str(refused.json())
    metanas = _finished_metanas_run(users["owner"])
    refused = api.post(
        "/api/runs/adapt/", {**body, "supernet": metanas.pk, "search_precision": "bfloat16"}, format="json"
    )
    assert refused.status_code == 400 and "MetaNAS" in refused.json()["error"]
    before = AdaptionRun.objects.count()
    settings.NASWEB_ADAPT_DEVICE = "cuda"
    refused = api.post("/api/runs/adapt/", {**body, "search_precision": "bfloat16"}, format="json")
    assert refused.status_code == 400 and "CPU option" in refused.json()["error"]
    settings.NASWEB_ADAPT_DEVICE = "cpu"
    monkeypatch.setattr(cpu_features, "bfloat16_flags", lambda: [])
    refused = api.post("/api/runs/adapt/", {**body, "search_precision": "bfloat16"}, format="json")
    assert refused.status_code == 400 and "no bfloat16 instructions" in refused.json()["error"]
    refused = client.post("/runs/adapt/", {**fields, "search_precision": "bfloat16"})
    assert refused.status_code == 400 and "no bfloat16 instructions" in refused.content.decode()
    assert AdaptionRun.objects.count() == before
    assert (
        api.post("/api/runs/adapt/", {**body, "search_precision": "float32"}, format="json").status_code
        == 201
    )


def test_depth_elites_go_from_the_form_and_the_api_to_the_run(client, users, runs):
    """Elites of every depth override the preset's 0 (Algorithm 1's elites); blank or 0 keeps it;
    the run page says so; out-of-range values and a MetaNAS run are refused, nothing is queued."""
    supernet, _, _ = runs
    client.force_login(users["owner"])
    cpu, fields = _adaption_form_fields(supernet, "cpu")
    assert 'name="depth_elites"' in client.get("/runs/adapt/").content.decode()
    run, page = _posted_run(client, fields, depth_elites="2")
    assert run.depth_elites == 2 and "keeps the best 2 of every depth" in page
    blank, page = _posted_run(client, fields, depth_elites="")
    assert blank.depth_elites == 0 and "of every depth" not in page

    def requested(run: AdaptionRun) -> int | None:
        return services._adaption_request(run, Path(run.out_dir) / "state.json", progress=None).depth_elites

    assert (requested(run), requested(blank)) == (2, None)  # None: the preset's
    before = AdaptionRun.objects.count()
    for bad in ("-1", str(MAX_DEPTH_ELITES + 1), "two"):
        assert client.post("/runs/adapt/", {**fields, "depth_elites": bad}).status_code == 400

    api, body = _owner_api(users), _api_adaption_body(supernet, cpu)
    created = api.post("/api/runs/adapt/", {**body, "depth_elites": 1}, format="json")
    assert created.status_code == 201 and created.json()["depth_elites"] == 1
    assert api.post("/api/runs/adapt/", body, format="json").json()["depth_elites"] == 0
    refused = api.post("/api/runs/adapt/", {**body, "depth_elites": MAX_DEPTH_ELITES + 1}, format="json")
    assert refused.status_code == 400 and "depth_elites" in str(refused.json())
    metanas = _finished_metanas_run(users["owner"])
    refused = api.post("/api/runs/adapt/", {**body, "supernet": metanas.pk, "depth_elites": 1}, format="json")
    assert refused.status_code == 400 and "MetaNAS" in refused.json()["error"]
    assert AdaptionRun.objects.count() == before + 2
    with pytest.raises(services.RunInputError, match="whole number"):
        services.adaption_start(owner=users["owner"], supernet=supernet, device=cpu, constraint="params",
                                budgets=[3000.0], depth_elites=True)  # fmt: skip
    # The tiny preset's pool of 12 keeps its best one; two of each of four depths would leave it
    # fewer than six children.
    refused = api.post("/api/runs/adapt/", {**body, "preset": "tiny", "depth_elites": 2}, format="json")
    assert refused.status_code == 400 and "at most 1 with this preset" in refused.json()["error"]
    assert (
        api.post("/api/runs/adapt/", {**body, "preset": "tiny", "depth_elites": 1}, format="json").status_code
        == 201
    )


def test_the_api_lists_only_own_runs_and_validates(users, runs):
    supernet, adaption, model = runs
    client = APIClient()
    assert client.get("/api/runs/train/").status_code in (401, 403)
    from rest_framework.authtoken.models import Token

    token = Token.objects.create(user=users["owner"])
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    assert [r["id"] for r in client.get("/api/runs/train/").json()] == [supernet.pk]
    assert [m["id"] for m in client.get(f"/api/runs/adapt/{adaption.pk}/").json()["models"]] == [model.pk]
    assert client.get(f"/api/models/{model.pk}/card").status_code == 200
    bad = client.post(
        "/api/runs/adapt/",
        {"supernet": supernet.pk, "device": adaption.device_id, "constraint": "params", "budgets": [0]},
        format="json",
    )
    assert bad.status_code == 400 and "finite positive" in bad.json()["error"]
    bad = client.post("/api/runs/train/", {"ways": 1}, format="json")
    assert bad.status_code == 400
    other = APIClient()
    other.force_authenticate(users["other"])
    assert other.get("/api/runs/train/").json() == []
    assert other.get(f"/api/runs/adapt/{adaption.pk}/").status_code == 404
    assert other.get(f"/api/models/{model.pk}/torchscript").status_code == 404
    assert other.post(f"/api/runs/adapt/{adaption.pk}/cancel/").status_code == 404


def _more_adaptions(template: AdaptionRun, count: int) -> None:
    for index in range(count):
        run = AdaptionRun.objects.create(
            owner=template.owner, supernet=template.supernet, device=template.device, constraint="params",
            budgets=[3000.0 + index], status=JobStatus.SUCCEEDED,
            result={"front": [{"arch_code": f"a{index}", "params": 2000 + index, "accuracy": 0.5}], "outcomes": []},
            history=[{"generation": g, "population": [{"params": 1, "accuracy": 0.1}] * 20} for g in range(5)],
        )  # fmt: skip
        AdaptedModel.objects.create(
            run=run, budget=3000 + index, arch={}, card={"params": 2000}, torchscript="x", card_path="y"
        )


def test_lists_cost_the_same_queries_for_3_or_30_runs(users, runs):
    """No per-row queries (N+1) in the pages and API lists a dashboard polls; load benchmark: docs/BENCHMARKS.md."""
    supernet, adaption, _ = runs
    client = APIClient()
    client.force_authenticate(users["owner"])
    browser = Client()
    browser.force_login(users["owner"])
    counts = {}
    for total in (3, 30):
        _more_adaptions(adaption, total - AdaptionRun.objects.count())
        for url, caller in [
            ("/api/runs/adapt/", client),
            ("/runs/adapt/", browser),
            (f"/runs/compare/{supernet.pk}.json", browser),
        ]:
            with CaptureQueriesContext(connection) as queries:
                assert caller.get(url).status_code == 200
            counts.setdefault(url, []).append(len(queries))
    assert all(small == large for small, large in counts.values()), counts
    listing = client.get("/api/runs/adapt/").json()
    assert len(listing) == 30 and all(len(row["models"]) == 1 for row in listing)
    series = browser.get(f"/runs/compare/{supernet.pk}.json").json()["series"]
    assert len(series) == 30
    fronts = {row["run"]: row["front"] for row in series}
    assert fronts[adaption.pk] == []
    assert all(fronts[run.pk] == run.result["front"] for run in AdaptionRun.objects.exclude(pk=adaption.pk))


def test_lists_are_paginated_without_cutting_anything_off(users, runs):
    """API lists keep a JSON-list body and say where the rest is (Link, X-Total-Count); pages get a pager."""
    supernet, adaption, _ = runs
    _more_adaptions(adaption, 119)  # 120 runs, 120 models
    client = APIClient()
    client.force_authenticate(users["owner"])

    seen, url, pages = [], "/api/runs/adapt/", 0
    while url:
        response = client.get(url)
        assert response.status_code == 200 and isinstance(response.json(), list)
        assert response["X-Total-Count"] == "120"
        seen += [row["id"] for row in response.json()]
        links = response.headers.get("Link", "")
        url = links.split(">")[0].lstrip("<") if 'rel="next"' in links.split(",")[0] else None
        pages += 1
    assert pages == 3  # 50 + 50 + 20
    assert seen == list(AdaptionRun.objects.order_by("-created_at", "-pk").values_list("pk", flat=True))

    first = client.get("/api/models/?limit=7").json()
    assert len(first) == 7 and first[0]["run"] == max(AdaptionRun.objects.values_list("pk", flat=True))
    for row in first[:2]:  # the list's cached JSON of a model is its detail answer
        assert row == client.get(f"/api/models/{row['id']}/").json()
    assert client.get("/api/models/?limit=7").json() == first  # served from the cache: the same
    assert len(client.get("/api/models/?limit=100000").json()) == 120  # capped at 500, not refused
    last = client.get("/api/models/?limit=50&offset=100")
    assert len(last.json()) == 20 and 'rel="prev"' in last["Link"] and 'rel="next"' not in last["Link"]
    assert client.get("/api/runs/train/")["X-Total-Count"] == "1"
    other = APIClient()
    other.force_authenticate(users["other"])
    assert other.get("/api/models/")["X-Total-Count"] == "0"

    browser = Client()
    browser.force_login(users["owner"])
    page = browser.get("/runs/adapt/").content.decode()
    assert "page 1 of 3 (120 runs)" in page and 'href="?page=2"' in page
    page3 = browser.get("/runs/adapt/?page=3").content.decode()
    assert page3.count('<tr><td><a href="/runs/adapt/') == 20
    assert browser.get("/runs/adapt/?page=999").status_code == 200  # out of range: the last page
    assert browser.get("/runs/adapt/?page=abc").status_code == 200  # not a number: the first page


def test_compare_json_serves_cached_fronts_and_sees_new_runs(users, runs):
    """A finished run's front is encoded once per process; names and new runs are always fresh."""
    from django.core.cache import cache

    supernet, adaption, _ = runs
    cache.clear()
    _more_adaptions(adaption, 3)
    browser = Client()
    browser.force_login(users["owner"])
    url = f"/runs/compare/{supernet.pk}.json"
    with CaptureQueriesContext(connection) as cold:
        first = browser.get(url)
    with CaptureQueriesContext(connection) as warm:
        second = browser.get(url)
    assert first.status_code == second.status_code == 200 and first["Content-Type"] == "application/json"
    assert first.json() == second.json()
    assert len(warm) == len(cold) - 1  # the fronts came from the cache, not the database
    series = {row["run"]: row for row in first.json()["series"]}
    assert len(series) == 4 and series[adaption.pk]["front"] == []
    newest = max(series)
    assert series[newest]["front"] == AdaptionRun.objects.get(pk=newest).result["front"]
    assert series[newest]["device"] == adaption.device.name and series[newest]["constraint"] == "params"

    adaption.device.name = "renamed board"
    adaption.device.save(update_fields=["name"])
    _more_adaptions(adaption, 1)
    third = browser.get(url).json()
    assert len(third["series"]) == 5 and {row["device"] for row in third["series"]} == {"renamed board"}


def test_the_training_form_offers_the_natural_image_datasets_and_refuses_what_cannot_run(
    client, users, tmp_path, monkeypatch
):
    from tests.engine._data_builders import write_mini_imagenet

    monkeypatch.setenv("NASWEB_DATA_DIR", str(tmp_path / "data"))
    client.force_login(users["owner"])
    form = {"method": Method.HMETANAS, "dataset": "mini-imagenet", "ways": 3, "shots": 1, "backbone": "vgg9", "preset": "tiny"}  # fmt: skip
    page = client.get("/runs/train/").content.decode()
    for name in ("Mini-ImageNet", "CIFAR-FS", "FC100"):
        assert name in page
    response = client.post("/runs/train/", form)
    assert response.status_code == 400 and "split file" in response.content.decode()
    write_mini_imagenet(
        tmp_path / "data", {"train": 5, "val": 3, "test": 3}, per_class=4, per_class_folders=False
    )
    response = client.post("/runs/train/", {**form, "ways": 5})
    assert response.status_code == 400
    assert "val split has 3 classes; 5-way tasks need 5" in response.content.decode()
    response = client.post("/runs/train/", {**form, "ways": 5, "method": Method.METANAS})
    assert response.status_code == 400
    assert "val split has 3 classes; 5-way tasks need 5" in response.content.decode()
    assert not MetaTrainingRun.objects.exists()
    # The API offers the same datasets and refuses with the same reasons.
    api = APIClient()
    api.force_authenticate(users["owner"])
    refused = api.post("/api/runs/train/", {**form, "ways": 5}, format="json")
    assert refused.status_code == 400 and "val split has 3 classes" in refused.json()["error"]
    created = api.post("/api/runs/train/", form, format="json")
    assert created.status_code == 201 and created.json()["dataset"] == "mini-imagenet"
    MetaTrainingRun.objects.all().delete()
    response = client.post("/runs/train/", form)
    run = MetaTrainingRun.objects.get()
    assert (
        response.status_code == 302
        and run.dataset == "mini-imagenet"
        and run.spec["dataset"] == "mini-imagenet"
    )


def test_a_board_is_profiled_for_a_super_net_s_own_search_space_from_its_page(client, users, runs):
    from devices.models import ProfilingJob
    from devices.services import space_key
    from engine.presets import search_space

    supernet, _, _ = runs
    space = search_space("tiny", dataset="cifar-fs", num_classes=5).to_dict()
    MetaTrainingRun.objects.filter(pk=supernet.pk).update(space=space, dataset="cifar-fs")
    board = device_services.board_register(owner=users["owner"], name="jetson").device
    theirs = device_services.board_register(owner=users["other"], name="their pi").device
    client.force_login(users["owner"])
    page = client.get(f"/runs/train/{supernet.pk}/").content.decode()
    # only devices this user may profile: their board, not the built-in devices nor others' boards
    section = page[page.index('id="profile-for-supernet"') :]
    assert section.count("<option") == 1 and "jetson" in section
    response = client.post(f"/runs/train/{supernet.pk}/profile/", {"device": board.pk})
    assert response.status_code == 302 and response.url == f"/devices/{board.pk}/"
    job = ProfilingJob.objects.get(device=board)
    assert job.space == space and job.space_key == space_key(space)
    assert job.total_layers == len(search_space("tiny", dataset="cifar-fs", num_classes=5).all_layer_specs())
    # someone else's board (invisible: 404), no device, a run that is not a finished super-net
    assert client.post(f"/runs/train/{supernet.pk}/profile/", {"device": theirs.pk}).status_code == 404
    response = client.post(f"/runs/train/{supernet.pk}/profile/", {"device": "x"}, follow=True)
    assert "choose a device to profile" in response.content.decode()
    MetaTrainingRun.objects.filter(pk=supernet.pk).update(status=JobStatus.RUNNING)
    response = client.post(f"/runs/train/{supernet.pk}/profile/", {"device": board.pk}, follow=True)
    assert "only a finished H-Meta-NAS super-net" in response.content.decode()
    MetaTrainingRun.objects.filter(pk=supernet.pk).update(
        status=JobStatus.SUCCEEDED, space={"num_classes": 5}
    )
    response = client.post(f"/runs/train/{supernet.pk}/profile/", {"device": board.pk}, follow=True)
    assert "stored search space cannot be read" in response.content.decode()
    assert ProfilingJob.objects.filter(device=board).count() == 1


@pytest.mark.parametrize(
    "value, kind, expected",
    [
        (3000.0, "params", "3,000"),
        (9816320, "macs", "9,816,320"),
        (0.10031, "latency_ms", "0.1003 ms"),
        (1000, "latency_ms", "1000 ms"),
        (12.5, "params", "12.5"),
        (None, "params", "—"),
        (float("nan"), "latency_ms", "—"),
        (True, "params", "—"),
    ],
)
def test_costs_are_written_in_their_unit(value, kind, expected):
    from nasweb.runs.templatetags.run_format import cost

    assert cost(value, kind) == expected


def test_budget_lists_and_accuracies_are_written_for_people():
    from nasweb.runs.templatetags.run_format import accuracy, costs, percent, points

    assert costs([3000.0, 8000.0], "params") == "3,000, 8,000"
    assert costs([0.05, 0.2], "latency_ms") == "0.05 ms, 0.2 ms"
    assert percent(0.4351) == "43.5" and percent(None) == "—"
    assert accuracy({"mean": 0.4351, "ci95": 0.0404}) == "43.5 ± 4.0 %"
    assert accuracy({"mean": 0.5}) == "50.0 ± — %"
    assert points({"mean": 0.0593, "ci95": 0.0112, "tasks": 600}) == "+5.9 ± 1.1 points"
    assert points({"mean": -0.0014, "ci95": 0.0}) == "-0.1 ± 0.0 points"
    assert points(None) == "—" and points({"mean": float("nan")}) == "—"


def test_the_detail_page_sets_each_model_against_random_search(client, users, runs):
    _, adaption, model = runs
    client.force_login(users["owner"])
    page = client.get(f"/runs/adapt/{adaption.pk}/").content.decode()
    assert "Against random search" in page and "random search:" not in page  # no random search in this card
    model.card = {
        **model.card,
        "accuracy": {"mean": 0.4881, "ci95": 0.0059, "tasks": 600},
        "random_search": {
            "arch_code": "d2:5/0.75/leakyrelu,5/2.25/selu",
            "test_accuracy": {"mean": 0.4288, "ci95": 0.006, "tasks": 600},
            "ga_minus_random": {"mean": 0.0593, "ci95": 0.0071, "tasks": 600},
        },
    }
    model.save()
    page = client.get(f"/runs/adapt/{adaption.pk}/").content.decode()
    assert "+5.9 ± 0.7 points" in page
    assert "random search: 42.9 ± 0.6 %, <code>d2:5/0.75/leakyrelu,5/2.25/selu</code>" in page
    # A card written before the paired difference: random search's accuracy alone.
    model.card["random_search"]["ga_minus_random"] = None
    model.save()
    page = client.get(f"/runs/adapt/{adaption.pk}/").content.decode()
    assert "ga-minus-random" not in page and "random search: 42.9 ± 0.6 %" in page


def test_the_training_page_writes_accuracies_to_one_decimal(client, users, runs):
    supernet, _, _ = runs
    client.force_login(users["owner"])
    page = client.get(f"/runs/train/{supernet.pk}/").content.decode()
    assert "50.0 ± 2.0 % over 60 tasks" in page
    assert "50.0 %" in client.get("/runs/train/").content.decode()


def test_every_run_says_what_its_search_minimised(client, users, runs):
    """The chart's y-axis is a mean query loss or a query error rate: the run's result says which;
    a running run's streamed generations; a queued one's request or preset (`cpu`: the error rate).
    Results written before the field searched on the loss, as every preset did then."""
    supernet, adaption, _ = runs
    client.force_login(users["owner"])

    def metric_of(run):
        payload = client.get(f"/runs/adapt/{run.pk}.json").json()
        page = client.get(f"/runs/adapt/{run.pk}/").content.decode()
        word = {"loss": "query loss", "accuracy": "query error rate"}[payload["search_metric"]]
        assert f'<span id="search-metric">{word}</span>' in page
        return payload["search_metric"]

    def run_with(**fields):
        values = dict(owner=adaption.owner, supernet=supernet, device=adaption.device, constraint="params",
                      budgets=[3000.0], preset="cpu")  # fmt: skip
        values.update(fields)
        return AdaptionRun.objects.create(**values)

    finished = JobStatus.SUCCEEDED
    assert metric_of(adaption) == "loss"  # a result from before the field, preset "tiny"
    old_cpu = run_with(
        status=finished, result={"front": [], "outcomes": [], "request": {"search_metric": None}}
    )
    assert metric_of(old_cpu) == "loss"  # `cpu` searched on the loss when it ran
    named = run_with(
        status=finished, result={"front": [], "outcomes": [], "request": {"search_metric": "accuracy"}}
    )
    assert metric_of(named) == "accuracy"
    new_cpu = run_with(status=finished, result={"front": [{"loss": 0.5, "costs": {"params": 2000}}], "outcomes": [],
                                                "search_metric": "accuracy"})  # fmt: skip
    assert metric_of(new_cpu) == "accuracy"
    assert metric_of(run_with(status=JobStatus.QUEUED)) == "accuracy"  # what `cpu` will search on
    assert metric_of(run_with(status=JobStatus.QUEUED, preset="paper")) == "loss"
    assert metric_of(run_with(status=JobStatus.QUEUED, request={"search_metric": "loss"})) == "loss"
    assert (
        metric_of(run_with(status=JobStatus.QUEUED, search_metric="loss")) == "loss"
    )  # the user's, over cpu's
    running = run_with(
        status=JobStatus.RUNNING, history=[{"generation": 0, "metric": "loss", "population": []}]
    )
    assert metric_of(running) == "loss"  # the worker's events, over the preset of this version

    series = client.get(f"/runs/compare/{supernet.pk}.json").json()["series"]
    assert {row["run"]: row["metric"] for row in series} == {
        adaption.pk: "loss",
        old_cpu.pk: "loss",
        named.pk: "accuracy",
        new_cpu.pk: "accuracy",
    }
