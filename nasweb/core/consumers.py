"""Websocket consumer: one group per job; the browser receives progress and status events."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from nasweb.core.models import job_model_for_kind

# Close codes the page understands (4000-4999 are application codes).
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        kwargs = self.scope["url_route"]["kwargs"]
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        job = await self._visible_job(user, kwargs["job_kind"], kwargs["job_id"])
        if job is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group_name = job.group_name
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        group = getattr(self, "group_name", None)
        if group:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The socket is server -> browser only; a ping lets clients measure liveness.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def job_progress(self, message) -> None:
        await self.send_json({"type": "progress", **message["payload"]})

    async def job_status(self, message) -> None:
        await self.send_json({"type": "status", **message["payload"]})

    @database_sync_to_async
    def _visible_job(self, user, kind: str, job_id: int):
        model = job_model_for_kind(kind)
        if model is None:
            return None
        return model.objects.visible_to(user).filter(pk=job_id).first()
