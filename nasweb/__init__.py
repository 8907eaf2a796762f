"""nasweb: the Django project (settings, URLs, ASGI, Celery app) and its dashboard apps."""

from .celery import app as celery_app

__all__ = ["celery_app"]
