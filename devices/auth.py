"""Device-token authentication for the board agent endpoints (and only those)."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from devices.models import DeviceStatus, DeviceToken, hash_device_token

KEYWORD = "Device"


class DeviceTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Device <token>`; request.auth becomes the DeviceToken row, the user stays anonymous."""

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode(errors="replace").split()
        if not header or header[0] != KEYWORD:
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Malformed device token header: use 'Device <token>'.")
        row = (
            DeviceToken.objects.select_related("device")
            .filter(token_hash=hash_device_token(header[1]))
            .first()
        )
        if row is None:
            raise exceptions.AuthenticationFailed("Unknown device token.")
        if row.revoked_at is not None or row.device.status == DeviceStatus.REVOKED:
            raise exceptions.AuthenticationFailed("This device token was revoked.")
        now = timezone.now()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 30:
            DeviceToken.objects.filter(pk=row.pk).update(last_used_at=now)
        return AnonymousUser(), row

    def authenticate_header(self, request) -> str:
        return KEYWORD


class IsDeviceAgent(permissions.BasePermission):
    message = "A valid device token is required."

    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, DeviceToken)
