"""Every model change ships with its migration (a missing one breaks `make run` on a fresh database)."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_no_model_change_lacks_a_migration():
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exited:  # --check exits 1 when a migration would be written
        pytest.fail(f"models changed without a migration (exit {exited.code}):\n{out.getvalue()}")
