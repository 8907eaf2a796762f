from django.contrib import admin

from nasweb.core.admin_actions import JOB_READONLY, cancel_jobs
from nasweb.core.models import WorkerReport


@admin.register(WorkerReport)
class WorkerReportAdmin(admin.ModelAdmin):
    list_display = ("id", "status", "queue", "hostname", "torch_version", "torch_threads", "created_at")
    list_filter = ("status", "queue")
    search_fields = ("hostname",)
    readonly_fields = JOB_READONLY
    actions = [cancel_jobs]
