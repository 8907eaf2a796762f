from django.urls import path

from devices import api, views

app_name = "devices"
urlpatterns = [
    path("devices/", views.device_list, name="list"),
    path("devices/register/", views.device_register, name="register"),
    path("devices/<int:pk>/", views.device_detail, name="detail"),
    path("devices/<int:pk>/profile/", views.device_profile, name="profile"),
    path("devices/<int:pk>/table.json", views.device_table_json, name="table-json"),
    path("profiling/<int:pk>.json", views.profiling_job_json, name="profiling-json"),
    path("api/devices/", api.DeviceListApi.as_view(), name="api-device-list"),
    path("api/devices/<int:pk>/", api.DeviceDetailApi.as_view(), name="api-device-detail"),
    path("api/devices/<int:pk>/profile/", api.DeviceProfileApi.as_view(), name="api-device-profile"),
    path("api/devices/<int:pk>/revoke/", api.DeviceRevokeApi.as_view(), name="api-device-revoke"),
    path(
        "api/devices/<int:pk>/rotate-token/",
        api.DeviceRotateTokenApi.as_view(),
        name="api-device-rotate-token",
    ),
    path("api/devices/<int:pk>/table/", api.DeviceTableApi.as_view(), name="api-device-table"),
    path("api/profiling/<int:pk>/", api.ProfilingJobApi.as_view(), name="api-profiling-detail"),
    path("api/profiling/<int:pk>/cancel/", api.ProfilingJobCancelApi.as_view(), name="api-profiling-cancel"),
    path("api/agent/job", api.AgentJobApi.as_view(), name="agent-job"),
    path("api/agent/jobs/<str:job_id>/results", api.AgentResultsApi.as_view(), name="agent-results"),
    path(
        "api/agent/jobs/<str:job_id>/models/<str:model_id>/file",
        api.AgentModelFileApi.as_view(),
        name="agent-model-file",
    ),
    path(
        "api/agent/jobs/<str:job_id>/models/<str:model_id>/result",
        api.AgentModelResultApi.as_view(),
        name="agent-model-result",
    ),
    path("api/agent/jobs/<str:job_id>/reference", api.AgentReferenceApi.as_view(), name="agent-reference"),
    path("api/agent/jobs/<str:job_id>/complete", api.AgentCompleteApi.as_view(), name="agent-complete"),
    path("agent/nasweb_agent.py", api.AgentDownloadApi.as_view(), name="agent-download"),
]
