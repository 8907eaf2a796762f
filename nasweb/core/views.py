from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpResponseBadRequest, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from nasweb.core.health import health_report
from nasweb.core.models import job_models


@never_cache
@require_GET
def healthz(request):
    report = health_report()
    return JsonResponse(report, status=200 if report["ok"] else 503)


@login_required
def home(request):
    from devices.models import Device

    active = []
    for model in job_models():
        if hasattr(model, "status_url"):
            active.extend(model.objects.visible_to(request.user).active().for_listing())
    active.sort(key=lambda job: job.created_at, reverse=True)
    return render(
        request,
        "core/home.html",
        {
            "devices": Device.objects.visible_to(request.user).with_table_summaries(),
            "active_jobs": active[:20],
        },
    )


#: Refusals whose message helps the caller (others, e.g. a bad Host header, stay generic).
EXPLAINED_REFUSALS = (RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent)


def bad_request(request, exception=None):
    message = str(exception) if isinstance(exception, EXPLAINED_REFUSALS) else "bad request"
    if request.path.startswith("/api/"):
        return JsonResponse({"error": message}, status=400)
    return HttpResponseBadRequest(f"Bad request: {message}", content_type="text/plain")
