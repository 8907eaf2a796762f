"""engine/ is pure PyTorch: importing every module of it must not import Django, Celery or Channels."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import importlib, pkgutil, sys
import engine
names = [m.name for m in pkgutil.walk_packages(engine.__path__, "engine.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"django", "celery", "channels", "nasweb", "devices"})
print(len(names), "modules;", "leaked:", leaked)
sys.exit(1 if leaked else 0)
"""


def run_bare_python(script: str, timeout: int) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter at the repository root, with no inherited environment
    (no DJANGO_SETTINGS_MODULE, nothing pre-imported)."""
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": ""},
    )


def test_engine_imports_without_django():
    result = run_bare_python(SCRIPT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked: []" in result.stdout


def test_the_web_process_reads_the_adaption_presets_without_pytorch():
    """The dashboard names a run's search metric from its preset (engine.adaption_presets) while
    serving pages, where importing PyTorch costs ~1.2 s and ~210 MB of memory per web process."""
    script = (
        "import sys, engine.adaption_presets as p; "
        "print(p.ADAPTION_PRESETS['cpu'].search_metric, 'torch' in sys.modules)"
    )
    result = run_bare_python(script, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["accuracy", "False"]
