"""Device pages: HTML shells; charts fetch their series from the JSON views below."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from devices import services
from devices.forms import BoardRegistrationForm, ProfilingForm
from devices.models import Device, LatencyTableRecord, ProfilingJob


def _visible_device(request, pk: int) -> Device:
    return get_object_or_404(Device.objects.visible_to(request.user), pk=pk)


@login_required
def device_list(request):
    devices = Device.objects.visible_to(request.user).with_table_summaries()
    return render(request, "devices/list.html", {"devices": devices})


@login_required
def device_register(request):
    form = BoardRegistrationForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        data = dict(form.cleaned_data)
        preset = data.pop("preset")
        speed_reference = data.pop("speed_reference")
        registration = services.board_register(owner=request.user, **data)
        job = services.profiling_start_preset(
            device=registration.device, owner=request.user, preset=preset, speed_reference=speed_reference
        )
        # The token is rendered in this response only; the database keeps its hash.
        return render(
            request,
            "devices/registered.html",
            {
                "device": registration.device,
                "token": registration.token,
                "agent_command": registration.agent_command(request.build_absolute_uri("/")),
                "job": job,
            },
        )
    status = 400 if request.method == "POST" else 200  # a refused submission, shown with its errors
    return render(request, "devices/register.html", {"form": form}, status=status)


def _chosen_table(request, device: Device) -> LatencyTableRecord | None:
    """The table named by ?table= (one of this device's; another id is a 404), else the newest."""
    try:
        return services.chosen_table(device, request.GET.get("table"))
    except LatencyTableRecord.DoesNotExist as exc:
        raise Http404("table must be the id of one of this device's latency tables") from exc


@login_required
def device_detail(request, pk: int):
    device = _visible_device(request, pk)
    job = ProfilingJob.objects.filter(device=device).order_by("-created_at").first()
    table = _chosen_table(request, device)
    tables = services.tables_by_space(device)
    return render(
        request,
        "devices/detail.html",
        {
            "device": device,
            "job": job,
            "table": table,
            "table_space": services.describe_space(table.space) if table else "",
            "tables": tables,
            "may_profile": services.may_profile(request.user, device),
            "profiling_form": ProfilingForm(
                space_choices=services.profiling_space_choices(device, tables),
                times_in_context=services.times_in_context(device),
            ),
        },
    )


@login_required
@require_POST
def device_profile(request, pk: int):
    device = _visible_device(request, pk)
    if not services.may_profile(request.user, device):
        raise PermissionDenied("only the board's owner (or staff for built-in devices) can re-profile it")
    form = ProfilingForm(
        request.POST,
        space_choices=services.profiling_space_choices(device),
        times_in_context=services.times_in_context(device),
    )
    if not form.is_valid():
        messages.error(request, f"Invalid profiling settings: {form.errors.as_text()}")
        return redirect("devices:detail", pk=pk)
    settings_of_job = {name: value for name, value in form.cleaned_data.items() if name != "space"}
    try:
        services.profiling_start_for_space(
            device=device, owner=request.user, space_dict=form.space_dict(), **settings_of_job
        )
    except ValueError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Profiling started.")
    return redirect("devices:detail", pk=pk)


@login_required
def device_table_json(request, pk: int):
    """Per-layer breakdown of a LUT (?table=, else the newest) and its predicted-vs-measured samples."""
    device = _visible_device(request, pk)
    table = _chosen_table(request, device)
    if table is None:
        return JsonResponse({"error": "no latency table yet"}, status=404)
    entries = table.table.get("entries", {})
    by_op: dict[str, list] = {}
    for key, ms in entries.items():
        fields = key.split("|")
        by_op.setdefault(fields[0], []).append({"key": key, "ms": ms})
    samples = (table.accuracy or {}).get("samples", [])
    return JsonResponse(
        {
            "device": device.name,
            "table": table.pk,
            "search_space": services.describe_space(table.space),
            "overhead_ms": table.table.get("overhead_ms", 0.0),
            "per_layer_ms": table.table.get("per_layer_ms", 0.0),
            "metadata": table.table.get("metadata", {}),
            "layers": by_op,
            "accuracy": {k: v for k, v in (table.accuracy or {}).items() if k != "samples"},
            "samples": [
                {"predicted_ms": s["predicted_ms"], "measured_ms": s["measured_ms"]} for s in samples
            ],
        }
    )


@login_required
def profiling_job_json(request, pk: int):
    job = get_object_or_404(
        ProfilingJob.objects.filter(device__in=Device.objects.visible_to(request.user)), pk=pk
    )
    return JsonResponse(
        {
            "id": job.pk,
            "status": job.status,
            "progress": job.progress,
            "message": job.progress_message,
            "done_layers": job.done_layers if job.done_layers else job.timings.count(),
            "total_layers": job.total_layers,
            "error": job.error,
        }
    )
