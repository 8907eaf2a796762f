from django.apps import AppConfig


class DevicesConfig(AppConfig):
    name = "devices"
    verbose_name = "Devices and latency profiling"

    def ready(self) -> None:
        from devices import schema  # noqa: F401 - registers the OpenAPI auth extension
