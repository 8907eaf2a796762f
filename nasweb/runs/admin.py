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
            services.metatrain_rerun(run, owner=request.user)
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
        for run in queryset.select_related("supernet", "device", "support_set"):
            services.adaption_rerun(run, owner=request.user)
        self.message_user(request, "Re-run started.", messages.SUCCESS)


@admin.register(AdaptedModel)
class AdaptedModelAdmin(admin.ModelAdmin):
    list_display = ("id", "run", "budget", "created_at")
    search_fields = ("run__name",)


@admin.register(SupportSet)
class SupportSetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "created_at")
    search_fields = ("name", "owner__username")
