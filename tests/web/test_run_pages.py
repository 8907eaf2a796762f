"""Run pages and API: the login/owner/staff boundary, form and API validation, downloads."""

from __future__ import annotations

import io
import zipfile

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from nasweb.core.models import JobStatus
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, Method

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
