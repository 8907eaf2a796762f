from django.urls import path

from nasweb.runs import api, views

app_name = "runs"
urlpatterns = [
    path("runs/train/", views.metatrain_list, name="metatrain-list"),
    path("runs/train/<int:pk>/", views.metatrain_detail, name="metatrain-detail"),
    path("runs/train/<int:pk>.json", views.metatrain_json, name="metatrain-json"),
    path("runs/train/<int:pk>/profile/", views.metatrain_profile_device, name="metatrain-profile-device"),
    path("runs/adapt/", views.adaption_list, name="adaption-list"),
    path("runs/adapt/<int:pk>/", views.adaption_detail, name="adaption-detail"),
    path("runs/adapt/<int:pk>.json", views.adaption_json, name="adaption-json"),
    path("runs/<str:kind>/<int:pk>/cancel/", views.job_cancel_view, name="cancel"),
    path("runs/compare/", views.compare, name="compare"),
    path("runs/compare/<int:pk>.json", views.compare_json, name="compare-json"),
    path("models/<int:pk>/<str:kind>", views.model_download, name="model-download"),
    path("api/runs/train/", api.MetaTrainingListApi.as_view(), name="api-metatrain-list"),
    path("api/runs/train/<int:pk>/", api.MetaTrainingDetailApi.as_view(), name="api-metatrain-detail"),
    path("api/runs/adapt/", api.AdaptionListApi.as_view(), name="api-adaption-list"),
    path("api/runs/adapt/<int:pk>/", api.AdaptionDetailApi.as_view(), name="api-adaption-detail"),
    path("api/runs/<str:kind>/<int:pk>/cancel/", api.RunCancelApi.as_view(), name="api-run-cancel"),
    path("api/models/", api.ModelListApi.as_view(), name="api-model-list"),
    path("api/models/<int:pk>/", api.ModelDetailApi.as_view(), name="api-model-detail"),
    path("api/models/<int:pk>/<str:kind>", api.ModelFileApi.as_view(), name="api-model-file"),
]
