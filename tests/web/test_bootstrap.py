"""First-run set-up: one admin account (password printed once when generated) and the built-in devices."""

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from devices.models import Device, DeviceKind

pytestmark = pytest.mark.django_db


def test_it_creates_an_admin_with_a_generated_password_once(monkeypatch):
    monkeypatch.delenv("NASWEB_ADMIN_PASSWORD", raising=False)
    out = StringIO()
    call_command("bootstrap", stdout=out)
    text = out.getvalue()
    assert "Created admin account 'admin' with password: " in text
    password = text.split("with password: ")[1].split()[0]
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(password)

    again = StringIO()
    call_command("bootstrap", stdout=again)
    assert "Created admin" not in again.getvalue()
    assert get_user_model().objects.filter(is_superuser=True).count() == 1


def test_it_uses_the_configured_password(monkeypatch):
    monkeypatch.setenv("NASWEB_ADMIN_PASSWORD", "configured-pw-999")
    out = StringIO()
    call_command("bootstrap", stdout=out)
    assert "configured-pw-999" not in out.getvalue()
    assert get_user_model().objects.get(username="admin").check_password("configured-pw-999")


def test_it_seeds_the_builtin_devices_idempotently():
    call_command("bootstrap", stdout=StringIO())
    call_command("bootstrap", stdout=StringIO())
    kinds = sorted(Device.objects.values_list("kind", flat=True))
    assert DeviceKind.LOCAL_CPU in kinds and DeviceKind.SIMULATED in kinds
    assert Device.objects.filter(builtin_key="local-cpu").count() == 1
    eyeriss = Device.objects.get(builtin_key="eyeriss")
    assert eyeriss.config["array_rows"] == 12 and eyeriss.config["array_cols"] == 14


def test_demo_is_queued_on_the_first_launch_only(monkeypatch):
    from nasweb.runs.demo import DEMO_NAME
    from nasweb.runs.models import MetaTrainingRun

    monkeypatch.setenv("NASWEB_ADMIN_PASSWORD", "configured-pw-999")
    out = StringIO()
    call_command("bootstrap", "--demo", stdout=out)
    assert "First launch: queued the demo run" in out.getvalue()
    demo = MetaTrainingRun.objects.get()
    assert demo.name == DEMO_NAME and demo.owner.is_superuser and demo.preset == "tiny"

    again = StringIO()
    call_command("bootstrap", "--demo", stdout=again)
    assert "demo" not in again.getvalue()
    assert MetaTrainingRun.objects.count() == 1


def test_demo_budgets_lie_strictly_between_the_smallest_and_largest_subnet():
    from engine.cost import arch_params
    from engine.presets import search_space
    from nasweb.runs.demo import demo_budgets

    space = search_space("tiny")
    low, high = arch_params(space, space.smallest()), arch_params(space, space.largest())
    budgets = demo_budgets(space.to_dict())
    assert low < budgets[0] < budgets[1] < high
