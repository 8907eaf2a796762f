"""ASGI entry point: HTTP through Django, websockets through Channels (session-authenticated)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nasweb.settings")
django_asgi_app = get_asgi_application()

from nasweb.core.lifeline import watch_parent_from_env  # noqa: E402

watch_parent_from_env()

# Imported after Django is set up: the routing imports consumers that import models.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from nasweb.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
