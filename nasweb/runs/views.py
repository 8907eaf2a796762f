"""Run pages: HTML shells plus the JSON their charts read (then the websocket extends them)."""

from __future__ import annotations

import json
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import F
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from devices.models import Device
from nasweb.core.fragments import cached_json
from nasweb.core.models import JobStatus
from nasweb.core.services import job_cancel
from nasweb.runs import services
from nasweb.runs.forms import AdaptionForm, MetaTrainingForm
from nasweb.runs.models import ADAPTABLE_METHODS, AdaptedModel, AdaptionRun, MetaTrainingRun, Method

#: Rows per page of the run lists (the newest first).
RUNS_PER_PAGE = 50


def _job_json(run) -> dict:
    return {
        "id": run.pk,
        "status": run.status,
        "progress": run.progress,
        "message": run.progress_message,
        "error": run.error,
    }


@login_required
def metatrain_list(request):
    form = MetaTrainingForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            run = services.metatrain_start(owner=request.user, **form.cleaned_data)
        except services.RunInputError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(run)
    page = _list_page(request, MetaTrainingRun.objects.visible_to(request.user).for_listing())
    # A refused submission re-renders the form with its errors, as a 400 so scripts see the refusal.
    status = 400 if request.method == "POST" else 200
    return render(
        request, "runs/metatrain_list.html", {"form": form, "runs": page, "page": page}, status=status
    )


def _list_page(request, runs):
    """One page of runs, newest first; ``?page=`` out of range or not a number gives the nearest page."""
    return Paginator(runs.order_by("-created_at", "-pk"), RUNS_PER_PAGE).get_page(request.GET.get("page"))


@login_required
def metatrain_detail(request, pk: int):
    run = get_object_or_404(MetaTrainingRun.objects.visible_to(request.user), pk=pk)
    return render(
        request,
        "runs/metatrain_detail.html",
        {"run": run, "profilable": services.profilable_devices(request.user, run)},
    )


@login_required
@require_POST
def metatrain_profile_device(request, pk: int):
    """Profile one of the user's devices over this super-net's search space."""
    run = get_object_or_404(MetaTrainingRun.objects.visible_to(request.user), pk=pk)
    device_id = request.POST.get("device", "")
    if not device_id.isdigit():
        messages.error(request, "choose a device to profile")
        return redirect(run)
    device = get_object_or_404(Device.objects.visible_to(request.user), pk=int(device_id))
    try:
        services.profile_device_for_supernet(user=request.user, run=run, device=device)
    except services.RunInputError as exc:
        messages.error(request, str(exc))
        return redirect(run)
    messages.success(request, f"Profiling {device.name} for this super-net's search space.")
    return redirect("devices:detail", pk=device.pk)


@login_required
def metatrain_json(request, pk: int):
    run = get_object_or_404(MetaTrainingRun.objects.visible_to(request.user), pk=pk)
    return JsonResponse({**_job_json(run), "history": run.history, "summary": run.summary, "spec": run.spec})


@login_required
@require_POST
def job_cancel_view(request, kind: str, pk: int):
    model = {"metatrain": MetaTrainingRun, "adaption": AdaptionRun}.get(kind)
    if model is None:
        raise Http404
    run = get_object_or_404(model.objects.visible_to(request.user), pk=pk)
    job_cancel(job=run)
    messages.info(request, f"Cancellation of {run} requested.")
    return redirect(run)


def _adaption_form(request, data=None, files=None):
    supernets = (
        MetaTrainingRun.objects.visible_to(request.user)
        .filter(method__in=ADAPTABLE_METHODS, status=JobStatus.SUCCEEDED)
        .for_listing()
    )
    devices = Device.objects.visible_to(request.user).exclude(status="revoked")
    return AdaptionForm(data, files, supernets=supernets, devices=devices)


@login_required
def adaption_list(request):
    posted = request.method == "POST"
    form = _adaption_form(request, request.POST if posted else None, request.FILES if posted else None)
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        upload = data.pop("support_zip")
        try:
            run = services.adaption_start_with_upload(owner=request.user, support_upload=upload, **data)
        except services.RunInputError as exc:
            form.add_error(None, str(exc))
        else:
            return redirect(run)
    page = _list_page(
        request,
        AdaptionRun.objects.visible_to(request.user).select_related("device").for_listing(),
    )
    status = 400 if request.method == "POST" else 200  # a refused submission, shown with its errors
    return render(
        request, "runs/adaption_list.html", {"form": form, "runs": page, "page": page}, status=status
    )


@login_required
def adaption_detail(request, pk: int):
    run = get_object_or_404(
        AdaptionRun.objects.visible_to(request.user).select_related("device", "supernet"), pk=pk
    )
    context = {"run": run, "models": run.models.all()}
    if run.supernet.is_supernet:
        context["search_metric"] = services.search_metric_of(run)
    return render(request, "runs/adaption_detail.html", context)


def _baseline_point(baseline: dict) -> dict:
    """A MAML/MAML++ reference with its costs under the names the chart uses."""
    latency = baseline.get("latency_ms_lut")
    if latency is None:
        latency = baseline.get("measured_latency_ms")
    if isinstance(latency, dict):  # a TimingStats dict (measured MAML/MAML++ baselines)
        latency = latency.get("median_ms")
    return {
        "name": baseline.get("name"),
        "costs": {"params": baseline.get("params"), "macs": baseline.get("macs"), "latency_ms": latency},
        "accuracy": baseline.get("accuracy"),
        "source": baseline.get("source"),
    }


def adaption_payload(run: AdaptionRun) -> dict:
    result = run.result or {}
    return {
        **_job_json(run),
        "method": run.supernet.method,
        "device": run.device.name,
        "constraint": run.constraint,
        "budgets": run.budgets,
        # "loss" or "accuracy": what the fitness, front and search_loss values below measure.
        "search_metric": services.search_metric_of(run),
        "history": run.history,
        "front": result.get("front", []),
        "baselines": [_baseline_point(b) for b in result.get("baselines", [])],
        "outcomes": [
            {
                k: outcome.get(k)
                for k in (
                    "budget",
                    "arch_code",
                    "costs",
                    "constraint_met",
                    "search_loss",
                    "test_accuracy",
                    "random",
                )
            }
            for outcome in result.get("outcomes", [])
        ],
        "models": [
            {
                "id": m.pk,
                "budget": m.budget,
                "card": {k: m.card.get(k) for k in ("params", "macs", "arch_code", "measured_latency_ms")},
                "latency": m.latency,
            }
            for m in run.models.all()
        ],
    }


@login_required
def adaption_json(request, pk: int):
    run = get_object_or_404(
        AdaptionRun.objects.visible_to(request.user).select_related("device", "supernet"), pk=pk
    )
    return JsonResponse(adaption_payload(run))


@login_required
def compare(request):
    supernets = (
        MetaTrainingRun.objects.visible_to(request.user)
        .filter(method=Method.HMETANAS, status=JobStatus.SUCCEEDED)
        .for_listing()
    )
    chosen = (
        supernets.filter(pk=request.GET.get("supernet")).first()
        if request.GET.get("supernet")
        else supernets.first()
    )
    return render(request, "runs/compare.html", {"supernets": supernets, "chosen": chosen})


def _front_fragments(runs) -> dict[int, str]:
    """The JSON text of each finished run's Pareto front (a finished run's front never changes)."""

    def load(pks):
        rows = AdaptionRun.objects.filter(pk__in=pks).values("pk", front=F("result__front"))
        return ((row["pk"], row["front"] or []) for row in rows)

    return cached_json("front", runs, load)


@login_required
def compare_json(request, pk: int):
    supernet = get_object_or_404(MetaTrainingRun.objects.visible_to(request.user), pk=pk)
    runs = list(
        AdaptionRun.objects.visible_to(request.user)
        .filter(supernet=supernet, status=JobStatus.SUCCEEDED)
        .values_list(
            "pk",
            "finished_at",
            "constraint",
            "device__name",
            "result__search_metric",
            "result__request__search_metric",
        )
    )
    fronts = _front_fragments([(run_pk, finished_at) for run_pk, finished_at, *_ in runs])
    # Assembled as text around the cached fragments: re-encoding them would cost what caching saved.
    series = ",".join(
        f'{{"run": {run_pk}, "device": {json.dumps(device)}, "constraint": {json.dumps(constraint)}, '
        f'"metric": {json.dumps(services.finished_search_metric(metric, request_metric))}, '
        f'"front": {fronts[run_pk]}}}'
        for run_pk, _, constraint, device, metric, request_metric in runs
    )
    body = f'{{"supernet": {json.dumps(str(supernet))}, "series": [{series}]}}'
    return HttpResponse(body, content_type="application/json")


MODEL_FILES = {"torchscript": ("torchscript", "application/octet-stream", "model.pt"),
               "onnx": ("onnx", "application/octet-stream", "model.onnx"),
               "card": ("card_path", "application/json", "model_card.json")}  # fmt: skip


def model_file_response(model: AdaptedModel, kind: str):
    if kind not in MODEL_FILES:
        raise Http404
    field, content_type, filename = MODEL_FILES[kind]
    path = getattr(model, field)
    if not path or not Path(path).is_file():
        raise Http404(f"this model has no {kind} file")
    response = FileResponse(open(path, "rb"), content_type=content_type)
    response["Content-Disposition"] = (
        f'attachment; filename="nasweb-{model.run_id}-{model.budget:g}-{filename}"'
    )
    return response


@login_required
def model_download(request, pk: int, kind: str):
    model = get_object_or_404(
        AdaptedModel.objects.filter(run__in=AdaptionRun.objects.visible_to(request.user)), pk=pk
    )
    return model_file_response(model, kind)
