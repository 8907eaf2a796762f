"""Websocket routes of every app."""

from django.urls import path

from nasweb.core.consumers import JobProgressConsumer

websocket_urlpatterns = [
    path("ws/jobs/<str:job_kind>/<int:job_id>/", JobProgressConsumer.as_asgi()),
]
