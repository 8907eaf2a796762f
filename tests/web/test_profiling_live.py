"""Profiling for real: the agent as a subprocess against daphne (killed halfway and restarted), and the
built-in CPU and simulated Eyeriss profiled by a real Celery worker."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from django.contrib.auth import get_user_model

from devices import services
from devices.models import Device, DeviceStatus, LatencyTableRecord, LayerTiming
from nasweb.core.models import JobStatus
from tests.conftest import REPO_ROOT, free_port, start_daphne, tiny_space, wait_for_http, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

AGENT = REPO_ROOT / "engine" / "agent" / "nasweb_agent.py"


def _run_agent(server: str, token: str, log_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(AGENT),
            "--server",
            server,
            "--token",
            token,
            "--once",
            "--batch",
            "4",
            "--backoff",
            "0.2",
            *extra,
        ],
        stdout=open(log_path, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _settled_count(job, quiet_s: float = 1.0, timeout: float = 30.0) -> int:
    """The job's stored timings once no request has added any for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout
    count = LayerTiming.objects.filter(job=job).count()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = LayerTiming.objects.filter(job=job).count()
        if now == count:
            return count
        count = now
    raise AssertionError(f"timings of job {job.pk} still arriving after {timeout} s")


def test_agent_subprocess_killed_halfway_resumes_and_builds_the_table(tmp_path):
    owner = get_user_model().objects.create_user("live-owner", password="pw-live-owner-1")
    registration = services.board_register(owner=owner, name="slow-board")
    job = services.profiling_start(
        device=registration.device,
        owner=owner,
        space=tiny_space(),
        repeats=40,
        warmup=2,
        accuracy_subnets=2,
        overhead_subnets=2,
    )
    port = free_port()
    web = start_daphne(port, tmp_path / "daphne.log")
    server = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{server}/agent/nasweb_agent.py", child=web)
        # Small batches, and the kill happens in the same poll that sees the first batches, so it
        # lands halfway however fast this machine is (at most the in-flight batch lands after it).
        first = _run_agent(server, registration.token, tmp_path / "agent1.log", "--batch", "2")

        def killed_after_first_batches() -> bool:
            if first.poll() is not None:
                return True
            if LayerTiming.objects.filter(job=job).count() >= 4:
                first.send_signal(signal.SIGKILL)
                return True
            return False

        wait_until(killed_after_first_batches, timeout=120, interval=0.01, message="first batches")
        first.wait()
        assert first.returncode == -signal.SIGKILL, (tmp_path / "agent1.log").read_text()
        # A batch the agent posted just before the kill is still stored by the server after it
        # (seen in CI on PostgreSQL: 4 counted here, 6 stored): count once that has landed.
        stored_before = _settled_count(job)
        assert 0 < stored_before < job.total_layers
        kept = {row.key: (row.pk, row.ms) for row in LayerTiming.objects.filter(job=job)}

        second = _run_agent(server, registration.token, tmp_path / "agent2.log")
        assert second.wait(timeout=240) == 0, (tmp_path / "agent2.log").read_text()
        log = (tmp_path / "agent2.log").read_text()
        # It skipped what the first run delivered: at least what was counted (a request still held
        # by the server past the quiet second would land later and be skipped too).
        skipped = int(re.search(r"(\d+) done", log).group(1))
        assert stored_before <= skipped < job.total_layers, log
    finally:
        web.stop()
    timings = {row.key: (row.pk, row.ms) for row in LayerTiming.objects.filter(job=job)}
    assert {key: timings[key] for key in kept} == kept  # kept, not measured again
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED
    assert LayerTiming.objects.filter(job=job).count() == job.total_layers
    record = LatencyTableRecord.objects.get(device=registration.device)
    assert record.entries_count == job.total_layers
    assert record.table["metadata"]["source"] == "agent"
    # The agent calibrated its speed reference once; every timing of the job is at that base.
    assert job.reference_ms > 0 and record.table["metadata"]["speed_reference"]["base_ms"] == job.reference_ms
    assert record.accuracy["n"] == 2  # the held-out check models were timed on the "board"
    assert record.accuracy["overhead_fit_networks"] == 2
    assert record.table["metadata"]["overhead_fit"]["networks"] == 2
    assert all(sample["measured_ms"] > 0 for sample in record.accuracy["samples"])


def test_builtin_cpu_and_eyeriss_are_profiled_by_a_worker(celery_worker_process):
    services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    eyeriss = Device.objects.get(builtin_key="eyeriss")
    space = tiny_space()
    cpu_job = services.profiling_start(
        device=cpu, space=space, repeats=5, warmup=1, threads=1, accuracy_subnets=3
    )
    eyeriss_job = services.profiling_start(device=eyeriss, space=space)
    for job in (cpu_job, eyeriss_job):
        wait_until(
            lambda job=job: type(job).objects.get(pk=job.pk).is_finished,
            timeout=240,
            message=f"profiling of {job.device}; worker log:\n{celery_worker_process.log()[-3000:]}",
        )
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert job.result.entries_count == job.total_layers == 36
        # The device's status is written just after the job's (a separate update): wait for it.
        wait_until(
            lambda job=job: Device.objects.get(pk=job.device_id).status == DeviceStatus.READY,
            timeout=30,
            message=f"{job.device} ready",
        )
    cpu_table = LatencyTableRecord.objects.get(device=cpu)
    assert cpu_table.accuracy["n"] == 3
    # Entries and check networks at one reference speed of this CPU, the one stored on the job.
    cpu_job.refresh_from_db()
    eyeriss_job.refresh_from_db()
    assert cpu_job.reference_ms > 0 and eyeriss_job.reference_ms is None
    assert cpu_table.table["metadata"]["speed_reference"]["base_ms"] == cpu_job.reference_ms
    # The CPU's layers were timed again inside chains (the job's default 2 chains per layer).
    assert cpu_table.table["metadata"]["context"]["repeats_per_key"] == 2
    assert cpu_table.table["metadata"]["context"]["chains"] > 0
    # Both tables were scored on the 8 sub-nets timed whole (5 fit + 3 check) and one was kept.
    choice = cpu_table.table["metadata"]["context"]["choice"]
    assert choice["networks"] == 8 and choice["kept"] in ("in_context", "isolated")
    kept, other = (choice["in_context"], choice["isolated"])[:: 1 if choice["kept"] == "in_context" else -1]
    assert kept["mape"] <= other["mape"]
    assert set(cpu_table.accuracy) >= {"within_10pct", "mape", "mse"}
    assert cpu_table.accuracy["overhead_fit_networks"] == 5
    # Held out from the fit, each prediction has the right order of magnitude (a wrong unit, a
    # lost layer or a missing overhead is off by 1000x). The bound is loose on purpose: this tiny
    # space's sub-nets take tens of microseconds, where timing noise is large (CI saw a MAPE of
    # 84 %). Before the per-layer term, a constant overhead fitted on deeper nets came out negative
    # and CI saw a depth-1 net predicted at -0.036 ms. How close the LUT gets on the real space is
    # benchmarks/lut_accuracy.py's figure (docs/PROFILING.md).
    for sample in cpu_table.accuracy["samples"]:
        assert 0.05 < sample["predicted_ms"] / sample["measured_ms"] < 20, sample
    eyeriss_table = LatencyTableRecord.objects.get(device=eyeriss)
    assert eyeriss_table.table["metadata"]["runtime"] == "scalesim-compute-model"
    assert "context" not in eyeriss_table.table["metadata"]
    # The simulated accelerator is deterministic: every entry is cycles / clock.
    assert all(ms > 0 for ms in eyeriss_table.table["entries"].values())


def test_cancelling_a_running_profiling_job_keeps_its_partial_timings(celery_worker_process):
    from rest_framework.test import APIClient

    services.seed_builtin_devices()
    staff = get_user_model().objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    cpu = Device.objects.get(builtin_key="local-cpu")
    from engine.presets import search_space

    job = services.profiling_start(
        device=cpu, owner=staff, space=search_space("paper"), repeats=30, warmup=2, threads=1
    )
    wait_until(
        lambda: LayerTiming.objects.filter(job=job).count() >= 20, timeout=120, message="some layers measured"
    )
    client = APIClient()
    client.force_authenticate(staff)
    assert client.post(f"/api/profiling/{job.pk}/cancel/").status_code == 200
    wait_until(lambda: type(job).objects.get(pk=job.pk).is_finished, timeout=60, message="job cancelled")
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    kept = LayerTiming.objects.filter(job=job).count()
    assert 20 <= kept < job.total_layers
    assert not LatencyTableRecord.objects.filter(device=cpu).exists()
    wait_until(  # written just after the job's status
        lambda: Device.objects.get(pk=cpu.pk).status != DeviceStatus.PROFILING,
        timeout=30,
        message="device freed",
    )
