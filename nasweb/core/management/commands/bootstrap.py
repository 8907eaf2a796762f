"""First-run set-up used by `make run`: admin account and built-in devices (idempotent)."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin account on first run and seed the built-in devices."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--demo",
            action="store_true",
            help="on a first launch (no runs yet), queue the demo: a tiny super-net, then an adaption",
        )

    def handle(self, *args, **options) -> None:
        from devices.services import seed_builtin_devices

        user_model = get_user_model()
        if not user_model.objects.filter(is_superuser=True).exists():
            username = os.environ.get("NASWEB_ADMIN_USER", "admin")
            password = os.environ.get("NASWEB_ADMIN_PASSWORD")
            generated = not password
            if generated:
                password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser(username=username, email="", password=password)
            if generated:
                # Printed once; it is not stored anywhere in clear text.
                self.stdout.write(
                    self.style.WARNING(f"Created admin account '{username}' with password: {password}")
                )
            else:
                self.stdout.write(f"Created admin account '{username}' (password from NASWEB_ADMIN_PASSWORD)")
        devices = seed_builtin_devices()
        self.stdout.write(f"Built-in devices: {', '.join(device.name for device in devices)}")
        if options["demo"]:
            from nasweb.runs.demo import demo_start

            demo = demo_start()
            if demo is not None:
                self.stdout.write(
                    f"First launch: queued the demo run {demo.pk} (tiny super-net, then an adaption "
                    f"for this CPU); watch it at {demo.get_absolute_url()} (NASWEB_DEMO=0 to skip)"
                )
