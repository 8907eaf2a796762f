"""Production mode: secure cookies and HSTS behind TLS, and `manage.py check --deploy` is clean."""

from __future__ import annotations

import secrets
import subprocess
import sys

from tests.conftest import REPO_ROOT

PRODUCTION_ENV = {
    "PATH": "/usr/bin:/bin",
    "DJANGO_SETTINGS_MODULE": "nasweb.settings",
    "NASWEB_DEBUG": "0",
    "NASWEB_BEHIND_TLS": "1",
    "NASWEB_ALLOWED_HOSTS": "nasweb.example.com",
}


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env={**PRODUCTION_ENV, "NASWEB_SECRET_KEY": secrets.token_urlsafe(60), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_in_production_mode():
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env={**PRODUCTION_ENV, "NASWEB_SECRET_KEY": secrets.token_urlsafe(60)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_behind_tls_sets_secure_cookies_and_hsts():
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS >= 31536000, "
        "s.SECURE_PROXY_SSL_HEADER, s.DEBUG)"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True True True ('HTTP_X_FORWARDED_PROTO', 'https') False"


def test_without_tls_cookies_are_not_marked_secure():
    result = _run(
        "import django; django.setup(); from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.SECURE_HSTS_SECONDS)",
        NASWEB_BEHIND_TLS="0",
    )
    assert result.stdout.strip() == "False 0"
