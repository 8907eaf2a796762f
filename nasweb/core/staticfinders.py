"""Serve Plotly.js from the installed `plotly` package as static/vendor/plotly/plotly.min.js.

The dashboard must work without internet (no CDN), and a 4.6 MB minified bundle does not belong
in our repository: this finder exposes exactly that one file of the pinned package.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PLOTLY_STATIC_PATH = "vendor/plotly/plotly.min.js"


def plotly_bundle() -> Path:
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


class PlotlyFinder(BaseFinder):
    def check(self, **kwargs):
        from django.core.checks import Error

        if not plotly_bundle().is_file():
            return [Error(f"plotly.min.js not found at {plotly_bundle()}", id="nasweb.E001")]
        return []

    def find(self, path, find_all=False, **kwargs):
        if path == PLOTLY_STATIC_PATH and plotly_bundle().is_file():
            return [str(plotly_bundle())] if (find_all or kwargs.get("all")) else str(plotly_bundle())
        return [] if (find_all or kwargs.get("all")) else None

    def list(self, ignore_patterns):
        storage = FileSystemStorage(location=str(plotly_bundle().parent))
        storage.prefix = "vendor/plotly"
        yield "plotly.min.js", storage
