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
