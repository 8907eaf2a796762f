from django.contrib import admin, messages

from devices import services
from devices.models import Device, DeviceToken, LatencyTableRecord, ProfilingJob
from nasweb.core.admin_actions import JOB_LIST_FILTER, JOB_READONLY, cancel_jobs


class DeviceTokenInline(admin.TabularInline):
    model = DeviceToken
    fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "status", "owner", "created_at")
    list_filter = ("kind", "status")
    search_fields = ("name", "description", "owner__username")
    inlines = [DeviceTokenInline]
    actions = ["revoke_boards"]

    @admin.action(description="Revoke the device tokens of selected boards")
    def revoke_boards(self, request, queryset):
        for device in queryset.filter(kind="remote"):
            services.device_revoke(device=device)
        self.message_user(request, "Revoked.", messages.SUCCESS)


@admin.register(ProfilingJob)
class ProfilingJobAdmin(admin.ModelAdmin):
    list_display = ("id", "device", "status", "done_layers", "total_layers", "owner", "created_at")
    list_filter = ("device__kind",) + JOB_LIST_FILTER
    search_fields = ("device__name", "owner__username", "error")
    readonly_fields = JOB_READONLY + ("total_layers", "done_layers", "result")
    exclude = ("layers", "space")
    actions = [cancel_jobs, "rerun"]

    @admin.action(description="Re-run selected profiling jobs (same settings)")
    def rerun(self, request, queryset):
        from engine.space import SearchSpace

        for job in queryset.select_related("device"):
            services.profiling_start(
                device=job.device, owner=request.user, space=SearchSpace.from_dict(job.space),
                batch_size=job.batch_size, repeats=job.repeats, warmup=job.warmup, threads=job.threads,
                accuracy_subnets=job.accuracy_subnets, overhead_subnets=job.overhead_subnets,
                speed_reference=job.speed_reference, context_repeats=job.context_repeats,
            )  # fmt: skip
        self.message_user(request, "Re-run started.", messages.SUCCESS)


@admin.register(LatencyTableRecord)
class LatencyTableAdmin(admin.ModelAdmin):
    list_display = ("id", "device", "entries_count", "created_at")
    list_filter = ("device__kind",)
    search_fields = ("device__name",)
    exclude = ("table", "space")
    readonly_fields = ("device", "space_key", "entries_count", "accuracy", "created_at")
