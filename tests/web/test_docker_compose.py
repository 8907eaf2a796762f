"""docker-compose.yml is kept correct by reading (no Docker engine runs here)."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT


def _compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def _make_targets() -> dict[str, str]:
    """Makefile target -> its recipe text."""
    text = (REPO_ROOT / "Makefile").read_text()
    targets: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^([a-z][a-z-]*):", line)
        if match:
            current = match.group(1)
            targets[current] = ""
        elif current and line.startswith("\t"):
            targets[current] += line.strip() + "\n"
        elif not line.strip():
            continue
        else:
            current = None
    return targets


def test_it_has_the_four_services_with_artifact_volumes():
    services = _compose()["services"]
    assert set(services) == {"web", "worker", "redis", "postgres"}
    for name in ("web", "worker"):
        assert any(str(volume).startswith("artifacts:") for volume in services[name]["volumes"])
        assert services[name]["environment"]["NASWEB_ARTIFACT_DIR"] == "/artifacts"


def test_its_commands_are_the_makefile_targets_that_make_run_uses():
    services = _compose()["services"]
    targets = _make_targets()
    assert services["web"]["command"] == ["make", "bootstrap", "web"]
    assert services["worker"]["command"] == ["make", "worker"]
    assert "-m nasweb.serve" in targets["web"]
    assert "celery -A nasweb worker" in targets["worker"]
    assert "manage.py migrate" in targets["bootstrap"] and "manage.py bootstrap" in targets["bootstrap"]
    # make run's launcher starts the same two programs with the same arguments.
    launcher = (REPO_ROOT / "nasweb" / "launcher.py").read_text()
    assert '"celery", "-A", "nasweb", "worker"' in launcher
    assert '"-m", "nasweb.serve"' in launcher


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(
    _compose_command() is None, reason="neither docker-compose nor the docker compose plugin is installed"
)
def test_docker_compose_config_accepts_it():
    result = subprocess.run(
        [*_compose_command(), "config", "--quiet"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "NASWEB_SECRET_KEY": "x" * 50},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
