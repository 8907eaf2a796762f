"""The env-driven settings: typed helpers fail loud, production refuses the default secret key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from nasweb.settings import env_bool, env_int, env_list, env_secret
from tests.conftest import REPO_ROOT


def test_env_bool(monkeypatch):
    monkeypatch.setenv("X_FLAG", "yes")
    assert env_bool("X_FLAG", False) is True
    monkeypatch.setenv("X_FLAG", "0")
    assert env_bool("X_FLAG", True) is False
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_FLAG='maybe' is not a boolean"):
        env_bool("X_FLAG", False)


def test_env_int(monkeypatch):
    monkeypatch.setenv("X_NUM", "12")
    assert env_int("X_NUM", 1) == 12
    monkeypatch.setenv("X_NUM", "twelve")
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        env_int("X_NUM", 1)
    monkeypatch.setenv("X_NUM", "0")
    with pytest.raises(ImproperlyConfigured, match=">= 1"):
        env_int("X_NUM", 1, minimum=1)


def test_env_list_and_secret_file(monkeypatch, tmp_path):
    monkeypatch.setenv("X_LIST", "a, b,,c")
    assert env_list("X_LIST", []) == ["a", "b", "c"]
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("X_KEY_FILE", str(secret))
    assert env_secret("X_KEY", "default") == "s3cret"
    monkeypatch.setenv("X_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="cannot be read"):
        env_secret("X_KEY", "default")


def _django_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "nasweb.settings",
        "NASWEB_SECRET_KEY_FILE": "",
    }
    base.update(env)
    # An empty *_FILE must not count as "a key was given": drop it so the generated-key lookup is tested cleanly.
    base = {k: v for k, v in base.items() if v != ""}
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args], cwd=REPO_ROOT, env=base, capture_output=True, text=True
    )


def test_production_refuses_the_default_secret_key():
    from nasweb.settings import DEFAULT_SECRET_KEY

    result = _django_check({"NASWEB_DEBUG": "0", "NASWEB_SECRET_KEY": DEFAULT_SECRET_KEY})
    assert result.returncode != 0
    assert "NASWEB_SECRET_KEY" in result.stderr


def test_debug_mode_accepts_the_default_secret_key():
    result = _django_check({"NASWEB_DEBUG": "1"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["NASWEB_TRAIN_DEVICE", "NASWEB_ADAPT_DEVICE"])
def test_an_unknown_device_is_refused(name):
    result = _django_check({"NASWEB_DEBUG": "1", name: "tpu"})
    assert result.returncode != 0
    assert f"{name} must be 'cpu' or 'cuda'" in result.stderr
