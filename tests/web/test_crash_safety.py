"""Crash safety with real workers: kill -9 mid-job, a new worker resumes it to the uninterrupted
result; Redis restarted under queued and running jobs, every job completes exactly once.

The workers here use their own redis-server (started by this module), so the session's shared
worker cannot take these tasks, and the Redis restart touches nothing else.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from django.conf import settings
from django.contrib.auth import get_user_model

from devices import services as device_services
from devices.models import Device, LatencyTableRecord, LayerTiming
from nasweb.core.models import JobStatus, WorkerReport
from nasweb.core.recovery import RecoveryScanner, broker_task_ids, job_claim, lease_owner_id
from nasweb.core.services import worker_report_request
from nasweb.runs import services
from nasweb.runs.models import AdaptedModel, MetaTrainingRun, Method
from tests.conftest import child_env, free_port, start_worker, tiny_space, wait_for_worker, wait_until

pytestmark = [pytest.mark.django_db(transaction=True)]

#: Long enough to be killed in the middle (checkpoints every 4 iterations in the tiny preset).
ITERATIONS = 160
#: Fast leases and scans so a test does not wait on production timings (90 s lease, 30 s scans).
WORKER_TIMINGS = {
    "NASWEB_JOB_HEARTBEAT_S": "1",
    "NASWEB_JOB_LEASE_S": "10",
    "NASWEB_RECOVERY_INTERVAL_S": "1",
    "NASWEB_LOST_MESSAGE_GRACE_S": "2",
    "NASWEB_TORCH_THREADS": "1",
}


class OwnRedis:
    """A redis-server for this module, restartable on the same port (without persistence: a
    restart loses every queued and unacknowledged message, the hardest case)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from nasweb.launcher import redis_answers, throwaway_redis_command

        self.process = subprocess.Popen(
            throwaway_redis_command(self.port, self.workdir),
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: redis_answers(self.url), timeout=20, message="own redis-server answers")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@contextmanager
def _broker(url: str):
    """Send this process's tasks to ``url`` (services enqueue through nasweb.celery.app)."""
    from nasweb.celery import app

    def point_at(target: str) -> None:
        app.conf.broker_url = target
        app._pool = None
        app.amqp._producer_pool = None

    previous = app.conf.broker_url
    point_at(url)
    try:
        yield app
    finally:
        point_at(previous)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    redis = OwnRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    yield redis
    redis.stop()


@pytest.fixture
def broker(own_redis):
    with _broker(own_redis.url) as app:
        yield app


def _worker(tmp_path: Path, name: str, redis: OwnRedis):
    worker = start_worker(
        tmp_path / f"{name}.log", env=child_env(CELERY_BROKER_URL=redis.url, **WORKER_TIMINGS), name=name
    )
    try:
        wait_for_worker(timeout=90)
    except TimeoutError:
        worker.stop()
        raise RuntimeError(f"worker {name} did not start:\n{worker.log()[-4000:]}") from None
    # Lowest CPU priority (inherited by the processes it forks later): on two cores the worker's
    # busy processes must not starve the test process that watches them and kills them in time.
    for process in _process_tree(worker):
        process.nice(19)
    return worker


def _kill_minus_9(worker) -> None:
    """SIGKILL the worker's main process and its pool children at once, as a crash would."""
    tree = _process_tree(worker)
    _signal_each(tree, signal.SIGKILL)
    worker.process.wait(timeout=20)
    psutil.wait_procs(tree, timeout=20)


def _kill_minus_9_once(worker, saved: Callable[[], int], at_least: int) -> bool:
    """Kill ``worker`` if ``saved()`` shows at least ``at_least`` steps, judged while it is frozen.

    The worker's process tree is stopped (SIGSTOP) before the state is read, so what is read is
    what the kill leaves behind. A plain read-then-kill raced on a loaded 2-core CI machine: the
    kill landed after the tiny adaption's last generation. ``saved`` must read files, not the
    database: a frozen worker may hold SQLite's lock.
    """
    tree = _process_tree(worker)
    _signal_each(tree, signal.SIGSTOP)
    try:
        if saved() >= at_least:
            _kill_minus_9(worker)
            return True
    finally:
        _signal_each(tree, signal.SIGCONT)  # harmless on the killed ones
    return False


def _process_tree(worker) -> list[psutil.Process]:
    main = psutil.Process(worker.process.pid)
    return [main, *main.children(recursive=True)]


def _signal_each(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:  # a search process that ended since the tree was listed
            pass


def _resumed_points(history: list[dict], last_saved: int) -> list[int]:
    """The ``current`` values of the resumed attempt's progress points.

    Not "the points after the kill" by position: a killed worker's last history flush can still
    commit after kill -9 returns (PostgreSQL finishes a COMMIT it has already received from a
    dead client; on a loaded machine that took long enough for the test to count the history
    first). So the resumed attempt is found by its values: the points after the last place where
    ``current`` falls (a restart repeats numbers), or, when it never falls, the points past
    ``last_saved``.
    """
    currents = [point["current"] for point in history]
    falls = [i for i in range(1, len(currents)) if currents[i] <= currents[i - 1]]
    if falls:
        return currents[falls[-1] :]
    return [current for current in currents if current > last_saved]


def _wait_finished(job, worker, timeout: float = 240):
    wait_until(
        lambda: type(job).objects.get(pk=job.pk).is_finished,
        timeout=timeout,
        interval=0.5,
        message=f"{job} finished; worker log:\n{worker.log()[-4000:]}",
    )
    job.refresh_from_db()
    return job


@pytest.fixture(scope="module")
def reference_supernet(tmp_path_factory):
    """The tiny super-net meta-trained without interruption, by the engine in this process."""
    from engine.meta.runs import RunSpec
    from engine.meta.service import execute_meta_training

    spec = RunSpec(dataset="omniglot", ways=5, shots=1, backbone="vgg9", preset="tiny",
                   iterations=ITERATIONS, seed=0, threads=settings.NASWEB_TORCH_THREADS)  # fmt: skip
    out = tmp_path_factory.mktemp("reference-supernet")
    summary = execute_meta_training(spec, out)
    return spec, out, summary


# --- leases ---------------------------------------------------------------------------------


def test_a_running_job_is_claimed_again_only_when_its_worker_is_gone(broker):
    report = WorkerReport.objects.create(queue="default", celery_task_id="not-sent")
    lease = job_claim(report)
    assert lease is not None and report.status == JobStatus.RUNNING and report.attempts == 1
    assert job_claim(WorkerReport.objects.get(pk=report.pk)) is None  # alive here: a duplicate

    sleeper = subprocess.Popen(["sleep", "60"])
    dead_owner = lease_owner_id(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    WorkerReport.objects.filter(pk=report.pk).update(lease_owner=dead_owner)
    scanners = [RecoveryScanner(broker), RecoveryScanner(broker)]
    assert scanners[0].run_once() == [f"workerreport #{report.pk}: its worker stopped"]
    assert scanners[1].run_once() == []  # the row changed: one scanner sends it, not two
    report.refresh_from_db()
    assert report.status == JobStatus.QUEUED and report.celery_task_id != "not-sent"
    assert report.celery_task_id in broker_task_ids(broker, {"default"})

    assert lease.finish(JobStatus.SUCCEEDED) is False  # the old holder can no longer write an end
    again = job_claim(report)
    assert again is not None and report.attempts == 2
    assert again.finish(JobStatus.SUCCEEDED) and WorkerReport.objects.get(pk=report.pk).is_finished
    assert job_claim(report) is None  # finished work is never done again

    cancelled = WorkerReport.objects.create(queue="default", celery_task_id="not-sent")
    assert job_claim(cancelled) is not None
    WorkerReport.objects.filter(pk=cancelled.pk).update(lease_owner=dead_owner, cancel_requested=True)
    assert scanners[0].run_once() == []  # cancelled while its worker was gone: not run again
    assert WorkerReport.objects.get(pk=cancelled.pk).status == JobStatus.CANCELLED


# --- kill -9 in the middle of a job -------------------------------------------------------


@pytest.mark.slow
def test_metatraining_resumes_after_kill_9_to_the_uninterrupted_result(
    broker, own_redis, reference_supernet, tmp_path
):
    from engine.meta.runs import RunSpec
    from engine.meta.train import CHECKPOINT_NAME, load_checkpoint

    spec, reference_dir, reference_summary = reference_supernet
    user = get_user_model().objects.create_user("crash-trainer", password="pw-crash-trainer-1")
    first = _worker(tmp_path, "first", own_redis)
    run = services.metatrain_start(
        owner=user, method=Method.HMETANAS, ways=5, preset="tiny", iterations=ITERATIONS
    )
    assert RunSpec.from_dict(run.spec) == spec
    metrics = Path(run.out_dir) / "metrics.json"

    def trained() -> int:
        try:
            return json.loads(metrics.read_text())["iteration"]
        except (OSError, ValueError):
            return 0

    wait_until(
        lambda: _kill_minus_9_once(first, trained, 40),
        timeout=180,
        interval=0.05,
        message="a few checkpoints written",
    )
    run.refresh_from_db()
    assert run.status == JobStatus.RUNNING and run.attempts == 1
    killed_at = load_checkpoint(Path(run.out_dir) / CHECKPOINT_NAME)["iteration"]
    assert 40 <= killed_at < ITERATIONS

    second = _worker(tmp_path, "second", own_redis)
    try:
        run = _wait_finished(run, second)
    finally:
        second.stop()
    assert run.status == JobStatus.SUCCEEDED, run.error
    assert run.attempts == 2 and run.summary["resumed"] is True
    resumed_points = _resumed_points(run.history, killed_at)
    assert resumed_points[0] == killed_at + 1  # continued after the last checkpoint, not from 0
    assert resumed_points == sorted(set(resumed_points))

    resumed = load_checkpoint(Path(run.out_dir) / CHECKPOINT_NAME)
    reference = load_checkpoint(reference_dir / CHECKPOINT_NAME)
    assert resumed["iteration"] == reference["iteration"] == ITERATIONS
    for name, value in reference["learner"].items():
        assert torch.equal(resumed["learner"][name], value), name  # bit for bit
    assert resumed["history"] == reference["history"]
    assert run.summary["test"] == reference_summary["test"]
    assert run.summary["test_smallest"] == reference_summary["test_smallest"]


def _comparable(result: dict) -> dict:
    """What must not depend on being interrupted (no timings, paths or creation times)."""
    keys = ("arch", "costs", "search_loss", "evaluations", "cache_hits", "test_accuracy")
    return {
        "outcomes": [{k: outcome[k] for k in keys} for outcome in result["outcomes"]],
        "front": result["front"],
        "evaluations": result["evaluations"],
        "cache_hits": result["cache_hits"],
    }


@pytest.mark.slow
def test_adaption_resumes_at_its_last_generation_after_kill_9(
    broker, own_redis, reference_supernet, tmp_path
):
    from engine.adaption import AdaptionRequest, run_adaption
    from engine.meta.runs import build_space

    spec, reference_dir, summary = reference_supernet
    user = get_user_model().objects.create_user("crash-adapter", password="pw-crash-adapter-1")
    supernet = MetaTrainingRun.objects.create(
        owner=user, method=Method.HMETANAS, ways=5, preset="tiny", spec=spec.to_dict(), summary=summary,
        space=build_space(spec).to_dict(), status=JobStatus.SUCCEEDED, out_dir=str(tmp_path / "supernet"),
    )  # fmt: skip
    shutil.copytree(reference_dir, supernet.out_dir)
    device_services.seed_builtin_devices()
    eyeriss = Device.objects.get(builtin_key="eyeriss")  # no wall-clock latency in the result

    first = _worker(tmp_path, "first", own_redis)
    budgets = [3000, 5000, 8000]
    run = services.adaption_start(
        owner=user, supernet=supernet, device=eyeriss, constraint="params", budgets=budgets
    )
    state_path = Path(run.out_dir) / "state.json"

    def generations_saved() -> int:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            return 0
        if state["ga_index"] is None:
            return len(state["completed"]) * 6
        return state["ga_index"] * 6 + state["ga_state"]["generation"]

    wait_until(
        lambda: _kill_minus_9_once(first, generations_saved, 2),
        timeout=180,
        interval=0.02,
        message="two GA generations",
    )
    saved = generations_saved()
    assert 2 <= saved < 6 * len(budgets), "killed after the GA: nothing left to resume at generation level"
    run.refresh_from_db()
    assert run.status == JobStatus.RUNNING

    second = _worker(tmp_path, "second", own_redis)
    try:
        run = _wait_finished(run, second)
    finally:
        second.stop()
    assert run.status == JobStatus.SUCCEEDED, run.error
    assert run.attempts == 2 and run.result["resumed"] is True
    resumed_generations = _resumed_points(run.history, saved)
    assert resumed_generations[0] == saved + 1  # the GA went on after its last saved generation
    assert resumed_generations == sorted(set(resumed_generations))
    assert AdaptedModel.objects.filter(run=run).count() == len(budgets)  # none twice

    reference = run_adaption(AdaptionRequest.from_dict(run.request), out_dir=tmp_path / "reference")
    assert _comparable(run.result) == _comparable(reference.to_dict())


@pytest.mark.slow
def test_profiling_keeps_its_timings_when_killed_and_completes_the_table(broker, own_redis, tmp_path):
    device_services.seed_builtin_devices()
    cpu = Device.objects.get(builtin_key="local-cpu")
    first = _worker(tmp_path, "first", own_redis)
    # Isolated timings only (context_repeats=0), so the table must equal the stored timings; the
    # in-context phase replaces every entry (tests/web/test_profiling_reference.py).
    job = device_services.profiling_start(
        device=cpu, space=tiny_space(), repeats=1000, warmup=2, threads=1, overhead_subnets=0,
        context_repeats=0,
    )  # fmt: skip

    # Killed in the same poll that sees 8 timings: on a quiet machine the 36 tiny layers take
    # about a second, so a separate wait-then-kill could land after the last one. (Not frozen
    # while counting, as the file-state tests are: a frozen worker can hold SQLite's lock.)
    def killed_after_some_layers() -> bool:
        if LayerTiming.objects.filter(job=job).count() >= 8:
            _kill_minus_9(first)
            return True
        return False

    wait_until(killed_after_some_layers, timeout=180, interval=0.01, message="some layers timed")
    kept = {row.key: (row.pk, row.ms) for row in LayerTiming.objects.filter(job=job)}
    assert 8 <= len(kept) < job.total_layers

    second = _worker(tmp_path, "second", own_redis)
    try:
        job = _wait_finished(job, second)
    finally:
        second.stop()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    timings = {row.key: (row.pk, row.ms) for row in LayerTiming.objects.filter(job=job)}
    assert len(timings) == job.total_layers == 36
    assert {key: timings[key] for key in kept} == kept  # kept, not measured again
    record = LatencyTableRecord.objects.get(device=cpu)  # one table, not one per delivery
    assert record.entries_count == 36
    assert record.table["entries"] == {key: ms for key, (_, ms) in timings.items()}


# --- Redis restarted under queued and running jobs ------------------------------------------


@pytest.mark.slow
def test_redis_restart_with_queued_and_running_jobs_runs_each_exactly_once(broker, own_redis, tmp_path):
    user = get_user_model().objects.create_user("restart-owner", password="pw-restart-owner-1")
    device_services.seed_builtin_devices()
    eyeriss = Device.objects.get(builtin_key="eyeriss")
    worker = _worker(tmp_path, "survivor", own_redis)
    try:
        # Long enough (about 20 s quiet) to be still running when Redis goes away on a slow machine.
        running = services.metatrain_start(owner=user, ways=5, preset="tiny", iterations=400)
        wait_until(
            lambda: MetaTrainingRun.objects.get(pk=running.pk).progress > 0.1,
            timeout=180,
            message="the first run is training",
        )
        queued = [
            services.metatrain_start(owner=user, ways=5, preset="tiny", iterations=12),
            device_services.profiling_start(device=eyeriss, space=tiny_space()),
            worker_report_request(queue="default"),
            worker_report_request(queue="adapt"),
        ]
        wait_until(
            lambda: all(type(job).objects.get(pk=job.pk).celery_task_id for job in queued),
            timeout=30,
            message="queued jobs sent",
        )
        assert broker_task_ids(broker, {"default", "train", "profile", "adapt"}) >= {
            type(job).objects.get(pk=job.pk).celery_task_id for job in queued
        }
        sent = {job.pk: type(job).objects.get(pk=job.pk).celery_task_id for job in queued}
        own_redis.stop()  # no persistence: the queued messages and the running one's ack are gone
        # What the test is about: a job still running while its broker goes away. (That it kept
        # running through the outage, not ran again, is checked below: attempts, not resumed.)
        assert MetaTrainingRun.objects.get(pk=running.pk).status == JobStatus.RUNNING
        time.sleep(2)
        own_redis.start()
        for job in [running, *queued]:
            _wait_finished(job, worker, timeout=240)
        time.sleep(3)  # a few more recovery scans: nothing may run again
    finally:
        worker.stop()
    for job in [running, *queued]:
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED, f"{job}: {job.error}"
        assert job.attempts == 1, f"{job} ran {job.attempts} times"
    assert running.summary["resumed"] is False  # it kept running through the outage
    for job in queued:  # their messages died with Redis: the workers' recovery sent them again
        assert job.celery_task_id != sent[job.pk]
    assert all(r.progress_message.startswith("queued again") for r in WorkerReport.objects.all())
    assert LatencyTableRecord.objects.filter(device=eyeriss).count() == 1
