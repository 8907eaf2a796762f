"""REST API for runs and adapted models (token auth for scripts, session auth for the browser)."""

from __future__ import annotations

from django.db.models import Prefetch
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from devices.models import Device
from nasweb.core.fragments import cached_json
from nasweb.core.models import JobStatus
from nasweb.core.pagination import LIST_PARAMETERS, HeaderLimitOffsetPagination, paginated_response
from nasweb.core.services import job_cancel
from nasweb.runs import services
from nasweb.runs.forms import (
    CONSTRAINTS,
    DATASETS,
    DEEPEN_CHOICES,
    DEEPEN_HELP,
    DEPTH_ELITES_HELP,
    PRESETS,
    SEARCH_METRIC_HELP,
    SEARCH_METRICS,
    SEARCH_PRECISION_CHOICES,
    SEARCH_PRECISION_HELP,
)
from nasweb.runs.models import (
    MAX_DEPTH_ELITES,
    MAX_PATIENCE,
    AdaptedModel,
    AdaptionRun,
    MetaTrainingRun,
    Method,
)
from nasweb.runs.views import adaption_payload, model_file_response

JOB_FIELDS = [
    "id",
    "name",
    "status",
    "progress",
    "progress_message",
    "error",
    "created_at",
    "started_at",
    "finished_at",
]


class MetaTrainingOutput(serializers.ModelSerializer):
    class Meta:
        model = MetaTrainingRun
        fields = JOB_FIELDS + ["method", "dataset", "ways", "shots", "backbone", "preset", "summary"]


class MetaTrainingInput(serializers.Serializer):
    name = serializers.CharField(max_length=120, required=False, default="", allow_blank=True)
    method = serializers.ChoiceField(choices=Method.choices, default=Method.HMETANAS)
    dataset = serializers.ChoiceField(
        choices=[d for d, _ in DATASETS], default="omniglot",
        help_text="Omniglot is downloaded when missing; the others must be in the server's data folder",
    )  # fmt: skip
    ways = serializers.IntegerField(min_value=2, max_value=50, default=5)
    shots = serializers.IntegerField(min_value=1, max_value=20, default=1)
    backbone = serializers.ChoiceField(choices=["vgg9", "resnet12"], default="vgg9")
    preset = serializers.ChoiceField(choices=[p for p, _ in PRESETS], default="tiny")


def _input(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _run_input_error(exc: services.RunInputError) -> Response:
    return Response({"error": str(exc)}, status=status.HTTP_400_BAD_REQUEST)


class MetaTrainingListApi(APIView):
    @extend_schema(responses=MetaTrainingOutput(many=True), parameters=LIST_PARAMETERS)
    def get(self, request):
        runs = MetaTrainingRun.objects.visible_to(request.user).for_listing().order_by("-created_at", "-pk")
        return paginated_response(request, runs, MetaTrainingOutput)

    @extend_schema(
        request=MetaTrainingInput, responses={201: MetaTrainingOutput}, summary="Start meta-training"
    )
    def post(self, request):
        try:
            run = services.metatrain_start(owner=request.user, **_input(MetaTrainingInput, request.data))
        except services.RunInputError as exc:
            return _run_input_error(exc)
        return Response(MetaTrainingOutput(run).data, status=status.HTTP_201_CREATED)


class MetaTrainingDetailApi(APIView):
    @extend_schema(responses=MetaTrainingOutput)
    def get(self, request, pk: int):
        return Response(
            MetaTrainingOutput(
                get_object_or_404(MetaTrainingRun.objects.visible_to(request.user), pk=pk)
            ).data
        )


class AdaptionOutput(serializers.ModelSerializer):
    models = serializers.SerializerMethodField()

    class Meta:
        model = AdaptionRun
        fields = JOB_FIELDS + [
            "supernet",
            "device",
            "constraint",
            "budgets",
            "preset",
            "patience",
            "search_metric",
            "deepen",
            "search_precision",
            "depth_elites",
            "support_set",
            "models",
        ]

    def get_models(self, run) -> list[int]:
        return [model.pk for model in run.models.all()]  # prefetched by the list view


class AdaptionInput(serializers.Serializer):
    name = serializers.CharField(max_length=120, required=False, default="", allow_blank=True)
    supernet = serializers.IntegerField()
    device = serializers.IntegerField()
    constraint = serializers.ChoiceField(choices=[c for c, _ in CONSTRAINTS])
    budgets = serializers.ListField(child=serializers.FloatField(), min_length=1, max_length=10)
    preset = serializers.ChoiceField(choices=[p for p, _ in PRESETS], default="tiny")
    patience = serializers.IntegerField(
        min_value=0, max_value=MAX_PATIENCE, default=0,
        help_text="stop a budget's GA once its best 10 % stood still this many generations (0: never)",
    )  # fmt: skip
    search_metric = serializers.ChoiceField(
        choices=[m for m, _ in SEARCH_METRICS], default="", allow_blank=True, help_text=SEARCH_METRIC_HELP
    )
    deepen = serializers.ChoiceField(
        choices=[m for m, _ in DEEPEN_CHOICES], default="", allow_blank=True, help_text=DEEPEN_HELP
    )
    search_precision = serializers.ChoiceField(
        choices=[p for p, _ in SEARCH_PRECISION_CHOICES], default="", allow_blank=True,
        help_text=SEARCH_PRECISION_HELP,
    )  # fmt: skip
    depth_elites = serializers.IntegerField(
        min_value=0, max_value=MAX_DEPTH_ELITES, default=0, help_text=DEPTH_ELITES_HELP
    )
    support_zip = serializers.FileField(required=False)


class AdaptionListApi(APIView):
    parser_classes = [JSONParser, MultiPartParser, FormParser]

    @extend_schema(responses=AdaptionOutput(many=True), parameters=LIST_PARAMETERS)
    def get(self, request):
        runs = (
            AdaptionRun.objects.visible_to(request.user)
            .for_listing()
            .prefetch_related(Prefetch("models", queryset=AdaptedModel.objects.only("id", "run")))
            .order_by("-created_at", "-pk")
        )
        return paginated_response(request, runs, AdaptionOutput)

    @extend_schema(request=AdaptionInput, responses={201: AdaptionOutput}, summary="Request an adapted model")
    def post(self, request):
        data = _input(AdaptionInput, request.data)
        supernet = get_object_or_404(
            MetaTrainingRun.objects.visible_to(request.user), pk=data.pop("supernet")
        )
        device = get_object_or_404(Device.objects.visible_to(request.user), pk=data.pop("device"))
        try:
            run = services.adaption_start_with_upload(
                owner=request.user, supernet=supernet, device=device,
                support_upload=data.pop("support_zip", None), **data,
            )  # fmt: skip
        except services.RunInputError as exc:
            return _run_input_error(exc)
        return Response(AdaptionOutput(run).data, status=status.HTTP_201_CREATED)


class AdaptionDetailApi(APIView):
    @extend_schema(responses={200: dict})
    def get(self, request, pk: int):
        run = get_object_or_404(AdaptionRun.objects.visible_to(request.user).select_related("device"), pk=pk)
        return Response({**AdaptionOutput(run).data, **adaption_payload(run)})


class RunCancelApi(APIView):
    @extend_schema(request=None, responses={200: dict}, summary="Cancel a queued or running run")
    def post(self, request, kind: str, pk: int):
        model = {"train": MetaTrainingRun, "adapt": AdaptionRun}.get(kind)
        if model is None:
            return Response({"error": "kind must be 'train' or 'adapt'"}, status=status.HTTP_404_NOT_FOUND)
        run = get_object_or_404(model.objects.visible_to(request.user), pk=pk)
        job_cancel(job=run)
        run.refresh_from_db()
        return Response({"id": run.pk, "status": run.status, "cancel_requested": run.cancel_requested})


class ModelOutput(serializers.ModelSerializer):
    class Meta:
        model = AdaptedModel
        fields = ["id", "run", "budget", "arch", "card", "created_at"]


def _models(request):
    return AdaptedModel.objects.filter(
        run__in=AdaptionRun.objects.visible_to(request.user), run__status=JobStatus.SUCCEEDED
    )


class ModelListApi(APIView):
    @extend_schema(responses=ModelOutput(many=True), parameters=LIST_PARAMETERS)
    def get(self, request):
        # Newest runs first (the model's own ordering is oldest first, for the run pages).
        models = _models(request).order_by("-run_id", "budget", "pk").only("pk", "created_at")
        paginator = HeaderLimitOffsetPagination()
        page = paginator.paginate_queryset(models, request, view=self)

        def load(pks):
            return ((m.pk, ModelOutput(m).data) for m in AdaptedModel.objects.filter(pk__in=pks))

        # An adapted model never changes once written: its JSON (mostly the model card) is
        # encoded once per process (nasweb.core.fragments), the list is assembled around it.
        texts = cached_json("model", [(m.pk, m.created_at) for m in page], load)
        body = "[" + ",".join(texts[m.pk] for m in page) + "]"
        return HttpResponse(body, content_type="application/json", headers=paginator.headers())


class ModelDetailApi(APIView):
    @extend_schema(responses=ModelOutput)
    def get(self, request, pk: int):
        return Response(ModelOutput(get_object_or_404(_models(request), pk=pk)).data)


class ModelFileApi(APIView):
    @extend_schema(
        operation_id="api_models_file_retrieve",
        responses={(200, "application/octet-stream"): bytes},
        summary="Download TorchScript, ONNX or the model card",
    )
    def get(self, request, pk: int, kind: str):
        return model_file_response(get_object_or_404(_models(request), pk=pk), kind)
