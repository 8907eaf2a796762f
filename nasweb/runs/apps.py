from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "nasweb.runs"
    label = "runs"
    verbose_name = "Meta-training and adaption runs"
