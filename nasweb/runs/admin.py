from django.contrib import admin, messages

from nasweb.core.admin_actions import JOB_LIST_FILTER, JOB_READONLY, cancel_jobs
from nasweb.runs import services
from nasweb.runs.models import AdaptedModel, AdaptionRun, MetaTrainingRun, SupportSet


@admin.register(MetaTrainingRun)
class MetaTrainingRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "name",
        "method",
        "dataset",
        "ways",
        "shots",
        "preset",
        "status",
        "owner",
        "created_at",
    )
    list_filter = ("method", "preset") + JOB_LIST_FILTER
    search_fields = ("name", "owner__username", "error")
    readonly_fields = JOB_READONLY + ("out_dir", "summary")
    exclude = ("history",)
    actions = [cancel_jobs, "rerun"]

    @admin.action(description="Re-run selected meta-training runs (same settings)")
    def rerun(self, request, queryset):
        for run in queryset:
            services.metatrain_start(
                owner=request.user, method=run.method, dataset=run.dataset, ways=run.ways, shots=run.shots,
                backbone=run.backbone, preset=run.preset, name=f"{run} (re-run)",
            )  # fmt: skip
        self.message_user(request, "Re-run started.", messages.SUCCESS)


@admin.register(AdaptionRun)
class AdaptionRunAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "supernet", "device", "constraint", "status", "owner", "created_at")
    list_filter = ("constraint", "preset") + JOB_LIST_FILTER
    search_fields = ("name", "device__name", "owner__username", "error")
    readonly_fields = JOB_READONLY + ("out_dir", "request")
    exclude = ("history", "result")
    actions = [cancel_jobs, "rerun"]

    @admin.action(description="Re-run selected adaption runs (same settings)")
    def rerun(self, request, queryset):
        for run in queryset.select_related("supernet", "device"):
            services.adaption_start(
                owner=request.user, supernet=run.supernet, device=run.device, constraint=run.constraint,
                budgets=run.budgets, preset=run.preset, support_set=run.support_set, name=f"{run} (re-run)",
            )  # fmt: skip
        self.message_user(request, "Re-run started.", messages.SUCCESS)


@admin.register(AdaptedModel)
class AdaptedModelAdmin(admin.ModelAdmin):
    list_display = ("id", "run", "budget", "created_at")
    search_fields = ("run__name",)


@admin.register(SupportSet)
class SupportSetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "created_at")
    search_fields = ("name", "owner__username")
