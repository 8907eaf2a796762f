from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "nasweb.core"
    label = "core"
    verbose_name = "nasweb core (jobs, health)"
