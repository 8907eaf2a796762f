"""REST endpoints: devices for users (session or token auth), the agent protocol for boards (device tokens)."""

from __future__ import annotations

from pathlib import Path

from django.http import FileResponse, HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import permissions, serializers, status
from rest_framework.exceptions import ParseError
from rest_framework.response import Response
from rest_framework.views import APIView

from devices import services
from devices.auth import DeviceTokenAuthentication, IsDeviceAgent
from devices.models import Device, DeviceKind, LatencyTableRecord, ProfilingJob
from nasweb.core.pagination import LIST_PARAMETERS, paginated_response

AGENT_FILE = Path(__file__).resolve().parent.parent / "engine" / "agent" / "nasweb_agent.py"


def _table_summary(table, description: str) -> dict:
    return {
        "id": table.id,
        "space_key": table.space_key,
        "search_space": description,
        "entries": table.entries_count,
        "created_at": table.created_at,
        "accuracy": _summary(table.accuracy),
    }


class DeviceOutput(serializers.ModelSerializer):
    latest_table = serializers.SerializerMethodField()
    tables = serializers.SerializerMethodField(
        help_text="the newest table of each search space, newest first"
    )

    class Meta:
        model = Device
        fields = [
            "id",
            "name",
            "kind",
            "status",
            "description",
            "config",
            "created_at",
            "latest_table",
            "tables",
        ]

    def _tables(self, device) -> list:
        # Both fields read the same list; DRF calls the two getters on one instance in turn.
        cached = getattr(device, "_space_tables", None)
        if cached is None:
            cached = device._space_tables = services.tables_by_space(device)
        return cached

    def get_latest_table(self, device) -> dict | None:
        tables = self._tables(device)
        return _table_summary(tables[0].latest, tables[0].description) if tables else None

    def get_tables(self, device) -> list[dict]:
        return [_table_summary(entry.latest, entry.description) for entry in self._tables(device)]


def _summary(accuracy: dict | None) -> dict | None:
    if not accuracy:
        return None
    return {k: accuracy.get(k) for k in ("n", "within_10pct", "mape", "mse")}


class DeviceListApi(APIView):
    class RegisterInput(serializers.Serializer):
        name = serializers.CharField(max_length=120)
        description = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")

    @extend_schema(responses=DeviceOutput(many=True), parameters=LIST_PARAMETERS)
    def get(self, request):
        devices = (
            Device.objects.visible_to(request.user).with_table_summaries().order_by("kind", "name", "pk")
        )
        return paginated_response(request, devices, DeviceOutput)

    @extend_schema(
        request=RegisterInput,
        responses={
            201: inline_serializer(
                "BoardRegistration",
                {
                    "device": DeviceOutput(),
                    "token": serializers.CharField(),
                    "agent_command": serializers.CharField(),
                },
            )
        },
        summary="Register a remote board; the device token is shown only in this answer",
    )
    def post(self, request):
        data = _validated(self.RegisterInput, request.data)
        registration = services.board_register(owner=request.user, **data)
        return Response(
            {
                "device": DeviceOutput(registration.device).data,
                "token": registration.token,
                "agent_command": registration.agent_command(request.build_absolute_uri("/")),
            },
            status=status.HTTP_201_CREATED,
        )


def _validated(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _device_for(request, pk: int) -> Device:
    return get_object_or_404(Device.objects.visible_to(request.user), pk=pk)


def _owned_board(request, pk: int) -> Device:
    device = _device_for(request, pk)
    if device.kind != DeviceKind.REMOTE or not (request.user.is_staff or device.owner_id == request.user.id):
        from rest_framework.exceptions import PermissionDenied

        raise PermissionDenied("only the board's owner can do this")
    return device


class DeviceDetailApi(APIView):
    @extend_schema(responses=DeviceOutput)
    def get(self, request, pk: int):
        return Response(DeviceOutput(_device_for(request, pk)).data)


class ProfilingJobOutput(serializers.ModelSerializer):
    class Meta:
        model = ProfilingJob
        fields = [
            "id", "device", "status", "progress", "progress_message", "error", "total_layers", "done_layers",
            "batch_size", "repeats", "warmup", "threads", "accuracy_subnets", "overhead_subnets", "speed_reference", "context_repeats", "created_at", "started_at",
            "finished_at", "result",
        ]  # fmt: skip


class DeviceProfileApi(APIView):
    class Input(serializers.Serializer):
        repeats = serializers.IntegerField(min_value=1, max_value=1000, default=20)
        warmup = serializers.IntegerField(min_value=0, max_value=1000, default=5)
        batch_size = serializers.IntegerField(min_value=1, max_value=256, default=1)
        threads = serializers.IntegerField(
            min_value=1, max_value=256, required=False, allow_null=True, default=None
        )
        accuracy_subnets = serializers.IntegerField(min_value=0, max_value=1000, default=0)
        overhead_subnets = serializers.IntegerField(min_value=0, max_value=100, default=5)
        speed_reference = serializers.BooleanField(
            default=True, help_text=ProfilingJob._meta.get_field("speed_reference").help_text
        )
        context_repeats = serializers.IntegerField(
            min_value=0, max_value=10, default=2,
            help_text=ProfilingJob._meta.get_field("context_repeats").help_text,
        )  # fmt: skip
        space_key = serializers.CharField(
            required=False,
            help_text="one of the device's tables' space_key (or the default space's); "
            "left out: the newest table's space, or the default space for a device without tables",
        )

    @extend_schema(
        request=Input, responses={201: ProfilingJobOutput}, summary="Start (re-)profiling a device"
    )
    def post(self, request, pk: int):
        device = _device_for(request, pk)
        if device.kind == DeviceKind.REMOTE:
            device = _owned_board(request, pk)
        elif not request.user.is_staff:
            from rest_framework.exceptions import PermissionDenied

            raise PermissionDenied("only staff can re-profile built-in devices")
        data = _validated(self.Input, request.data)
        spaces = {key: space for key, _, space in services.profiling_space_choices(device)}
        chosen_key = data.pop("space_key", None) or next(iter(spaces))
        if chosen_key not in spaces:
            raise serializers.ValidationError(
                {"space_key": [f"not a search space of this device; choose one of {sorted(spaces)}"]}
            )
        try:
            job = services.profiling_start_for_space(
                device=device, owner=request.user, space_dict=spaces[chosen_key], **data
            )
        except ValueError as exc:
            return Response({"error": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(ProfilingJobOutput(job).data, status=status.HTTP_201_CREATED)


class DeviceRevokeApi(APIView):
    @extend_schema(request=None, responses={200: DeviceOutput}, summary="Revoke a board's device tokens")
    def post(self, request, pk: int):
        device = _owned_board(request, pk)
        services.device_revoke(device=device)
        device.refresh_from_db()
        return Response(DeviceOutput(device).data)


class DeviceRotateTokenApi(APIView):
    @extend_schema(
        request=None,
        responses={
            200: inline_serializer(
                "RotatedToken", {"token": serializers.CharField(), "agent_command": serializers.CharField()}
            )
        },
        summary="Revoke the board's tokens and issue a new one (shown once)",
    )
    def post(self, request, pk: int):
        registration = services.board_token_rotate(device=_owned_board(request, pk))
        return Response(
            {
                "token": registration.token,
                "agent_command": registration.agent_command(request.build_absolute_uri("/")),
            }
        )


class DeviceTableApi(APIView):
    @extend_schema(
        responses={200: dict},
        parameters=[
            OpenApiParameter(
                "table", int, description="a table id from the device's `tables` (default: the newest)"
            )
        ],
        summary="One of the device's latency lookup tables (JSON)",
    )
    def get(self, request, pk: int):
        device = _device_for(request, pk)
        try:
            table = services.chosen_table(device, request.query_params.get("table"))
        except LatencyTableRecord.DoesNotExist:
            return Response(
                {"error": "table must be the id of one of this device's latency tables"},
                status=status.HTTP_404_NOT_FOUND,
            )
        if table is None:
            return Response(
                {"error": "this device has no latency table yet"}, status=status.HTTP_404_NOT_FOUND
            )
        return Response(
            {
                "id": table.id,
                "space_key": table.space_key,
                "search_space": services.describe_space(table.space),
                "space": table.space,
                "table": table.table,
                "accuracy": table.accuracy,
            }
        )


class ProfilingJobApi(APIView):
    @extend_schema(responses=ProfilingJobOutput)
    def get(self, request, pk: int):
        job = get_object_or_404(
            ProfilingJob.objects.filter(device__in=Device.objects.visible_to(request.user)), pk=pk
        )
        return Response(ProfilingJobOutput(job).data)


class ProfilingJobCancelApi(APIView):
    @extend_schema(
        request=None, responses=ProfilingJobOutput, summary="Cancel a queued or running profiling job"
    )
    def post(self, request, pk: int):
        from nasweb.core.services import job_cancel

        job = get_object_or_404(
            ProfilingJob.objects.filter(device__in=Device.objects.visible_to(request.user)), pk=pk
        )
        if not (request.user.is_staff or job.owner_id == request.user.id):
            from rest_framework.exceptions import PermissionDenied

            raise PermissionDenied("only the job's owner can cancel it")
        job_cancel(job=job)
        job.refresh_from_db()
        return Response(ProfilingJobOutput(job).data)


# --- agent protocol (device tokens only) ----------------------------------------------------


class AgentApi(APIView):
    authentication_classes = [DeviceTokenAuthentication]
    permission_classes = [IsDeviceAgent]

    def handle_exception(self, exc):
        if isinstance(exc, services.AgentProtocolError):
            return Response({"error": str(exc), **exc.extra}, status=exc.status)
        if isinstance(exc, ParseError):
            return Response({"error": f"malformed JSON: {exc.detail}"}, status=status.HTTP_400_BAD_REQUEST)
        return super().handle_exception(exc)

    def body(self, request):
        return request.data  # parsed lazily: a ParseError lands in handle_exception


class AgentJobApi(AgentApi):
    @extend_schema(responses={200: dict, 204: None}, summary="The board's current profiling job (agent)")
    def get(self, request):
        job = services.agent_current_job(token=request.auth)
        if job is None:
            return HttpResponse(status=204)
        return Response(job)


class AgentResultsApi(AgentApi):
    @extend_schema(request=dict, responses={200: dict}, summary="Post a batch of layer timings (agent)")
    def post(self, request, job_id: str):
        return Response(
            services.agent_post_results(token=request.auth, job_id=job_id, payload=self.body(request))
        )


class AgentReferenceApi(AgentApi):
    @extend_schema(
        request=dict,
        responses={200: dict},
        summary="Post the board's speed-reference time; the first is kept (agent)",
    )
    def post(self, request, job_id: str):
        return Response(
            services.agent_post_reference(token=request.auth, job_id=job_id, payload=self.body(request))
        )


class AgentModelFileApi(AgentApi):
    @extend_schema(
        responses={(200, "application/octet-stream"): bytes},
        summary="Download a model to time end to end (agent)",
    )
    def get(self, request, job_id: str, model_id: str):
        path = services.agent_model_file(token=request.auth, job_id=job_id, model_id=model_id)
        return FileResponse(open(path, "rb"), content_type="application/octet-stream")


class AgentModelResultApi(AgentApi):
    @extend_schema(request=dict, responses={200: dict}, summary="Post a whole-model latency (agent)")
    def post(self, request, job_id: str, model_id: str):
        return Response(
            services.agent_post_model_result(
                token=request.auth, job_id=job_id, model_id=model_id, payload=self.body(request)
            )
        )


class AgentCompleteApi(AgentApi):
    @extend_schema(
        request=dict,
        responses={200: dict, 409: dict},
        summary="Finish the job; builds the device's LUT (agent)",
    )
    def post(self, request, job_id: str):
        return Response(
            services.agent_complete(token=request.auth, job_id=job_id, payload=self.body(request))
        )


class AgentDownloadApi(APIView):
    """The self-contained agent file (no secrets in it, so no authentication)."""

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]

    @extend_schema(responses={(200, "text/x-python"): str}, summary="Download the board agent")
    def get(self, request):
        response = FileResponse(open(AGENT_FILE, "rb"), content_type="text/x-python")
        response["Content-Disposition"] = 'attachment; filename="nasweb_agent.py"'
        return response
