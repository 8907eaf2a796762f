"""Device services: built-in devices, board registration, profiling into lookup tables, the agent protocol.

The engine does the measuring (engine.latency); these functions move rows and files around it.
The agent protocol is documented in docs/AGENT_PROTOCOL.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import (
    AgentBatch,
    Device,
    DeviceKind,
    DeviceStatus,
    DeviceToken,
    LatencyTableRecord,
    LayerTiming,
    ModelMeasurement,
    ProfilingJob,
)
from nasweb.core.models import JobStatus
from nasweb.core.progress import JobProgress, broadcast_status

# Eyeriss as the H-Meta-NAS paper simulates it with scalesim: a 12x14 PE array.
EYERISS_CONFIG = {"array_rows": 12, "array_cols": 14, "dataflow": "os", "clock_mhz": 200}
MAX_RESULTS_PER_BATCH = 500


class AgentProtocolError(Exception):
    """A request of the agent protocol that must be refused; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


# --- built-in devices -----------------------------------------------------------------------


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seed_builtin_devices() -> list[Device]:
    """Create (or refresh) this server's CPU, its GPU when CUDA is present, and simulated Eyeriss."""
    import torch

    wanted = [
        (
            "local-cpu",
            DeviceKind.LOCAL_CPU,
            "This server's CPU",
            {"cpu": _cpu_model_name(), "machine": platform.machine()},
        ),
        ("eyeriss", DeviceKind.SIMULATED, "Eyeriss (simulated, scalesim 12x14)", dict(EYERISS_CONFIG)),
    ]
    if torch.cuda.is_available():
        wanted.append(
            ("local-gpu", DeviceKind.LOCAL_GPU, "This server's GPU", {"gpu": torch.cuda.get_device_name(0)})
        )
    devices = []
    for key, kind, name, config in wanted:
        device, created = Device.objects.get_or_create(
            builtin_key=key, defaults={"kind": kind, "name": name, "config": config}
        )
        if not created and any(device.config.get(k) != v for k, v in config.items() if k in ("cpu", "gpu")):
            device.config = {**device.config, **config}
            device.save(update_fields=["config"])
        devices.append(device)
    return devices


# --- boards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoardRegistration:
    device: Device
    token: str  # shown once; only its hash is stored

    def agent_command(self, server_url: str) -> str:
        base = server_url.rstrip("/")
        return (
            f"curl -fsSLo nasweb_agent.py {base}/agent/nasweb_agent.py && "
            f"python3 nasweb_agent.py --server {base} --token {self.token}"
        )


def board_register(*, owner, name: str, description: str = "") -> BoardRegistration:
    with transaction.atomic():
        device = Device.objects.create(
            kind=DeviceKind.REMOTE, name=name, description=description, owner=owner
        )
        _, token = DeviceToken.issue(device)
    return BoardRegistration(device=device, token=token)


def board_token_rotate(*, device: Device) -> BoardRegistration:
    """Revoke every token of the board and issue a new one (shown once)."""
    with transaction.atomic():
        DeviceToken.objects.filter(device=device, revoked_at__isnull=True).update(revoked_at=timezone.now())
        _, token = DeviceToken.issue(device)
        if device.status == DeviceStatus.REVOKED:
            device.status = DeviceStatus.NEW
            device.save(update_fields=["status"])
    return BoardRegistration(device=device, token=token)


def device_revoke(*, device: Device) -> None:
    """Revoke the board's tokens; its queued or running profiling jobs are cancelled."""
    with transaction.atomic():
        DeviceToken.objects.filter(device=device, revoked_at__isnull=True).update(revoked_at=timezone.now())
        device.status = DeviceStatus.REVOKED
        device.save(update_fields=["status"])
        for job in ProfilingJob.objects.filter(device=device).active():
            job.mark_finished(JobStatus.CANCELLED, "device revoked")


# --- profiling ------------------------------------------------------------------------------


def space_key(space_dict: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(space_dict, sort_keys=True).encode()).hexdigest()


def default_profiling_space():
    """The space the dashboard profiles by default: VGG9 on Omniglot 20-way (the paper's Table 10)."""
    from engine.presets import search_space

    return search_space("paper")


#: Profiling settings per preset; the space matches the meta-training preset of the same name.
PROFILING_PRESETS = {
    "paper": {"repeats": 20, "warmup": 5, "accuracy_subnets": 20},
    "cpu": {"repeats": 20, "warmup": 5, "accuracy_subnets": 20},
    "tiny": {"repeats": 5, "warmup": 1, "accuracy_subnets": 3, "overhead_subnets": 3},
}


def may_profile(user, device: Device) -> bool:
    """Who may (re-)profile a device: a remote board's owner, and staff for every device."""
    if device.kind == DeviceKind.REMOTE:
        return user.is_staff or device.owner_id == user.id
    return user.is_staff


def profiling_start_preset(
    *, device: Device, owner, preset: str, num_classes: int | None = None, speed_reference: bool = True
) -> ProfilingJob:
    from engine.presets import search_space

    return profiling_start(
        device=device,
        owner=owner,
        space=search_space(preset, num_classes=num_classes),
        speed_reference=speed_reference,
        **PROFILING_PRESETS[preset],
    )


def profiling_start(
    *,
    device: Device,
    owner=None,
    space=None,
    batch_size: int = 1,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    accuracy_subnets: int = 0,
    overhead_subnets: int = 5,
    speed_reference: bool = True,
    context_repeats: int = 2,
    enqueue: bool = True,
) -> ProfilingJob:
    """Create a profiling job; local and simulated devices are measured by a worker on the
    `profile` queue, remote boards by their agent (which polls for the job)."""
    if device.status == DeviceStatus.REVOKED:
        raise ValueError(f"device {device.name!r} is revoked")
    space = space or default_profiling_space()
    space_dict = space.to_dict()
    layers = [{"key": spec.key, "spec": spec.to_dict()} for spec in space.all_layer_specs()]
    with transaction.atomic():
        for active in ProfilingJob.objects.filter(device=device).active():
            active.mark_finished(JobStatus.CANCELLED, "superseded by a new profiling job")
        job = ProfilingJob.objects.create(
            device=device,
            owner=owner,
            space=space_dict,
            space_key=space_key(space_dict),
            layers=layers,
            total_layers=len(layers),
            batch_size=batch_size,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            accuracy_subnets=accuracy_subnets,
            overhead_subnets=overhead_subnets,
            speed_reference=speed_reference,
            context_repeats=context_repeats,
        )
        Device.objects.filter(pk=device.pk).update(status=DeviceStatus.PROFILING)
        if device.kind != DeviceKind.REMOTE and enqueue:
            transaction.on_commit(lambda: _enqueue_profiling(job.pk))
    return job


def profiling_start_for_space(
    *, device: Device, owner, space_dict: dict[str, Any], **job_settings
) -> ProfilingJob:
    """Re-profile ``device`` over a stored space (one of its tables'); ValueError if unreadable."""
    from engine.space import SearchSpace

    try:
        space = SearchSpace.from_dict(space_dict)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"this search space cannot be read ({exc})") from exc
    return profiling_start(device=device, owner=owner, space=space, **job_settings)


def _enqueue_profiling(job_id: int) -> None:
    from devices.tasks import profile_device

    result = profile_device.apply_async(args=[job_id], queue="profile")
    ProfilingJob.objects.filter(pk=job_id).update(celery_task_id=result.id)


def interleaved_purposes(fit: int, check: int) -> list[str]:
    """``fit`` "fit" and ``check`` "check" labels, the check ones spread evenly among the fit ones.

    The networks are timed in this order. Timing all fit networks first and all check networks
    last let any drift during the run (clock boost wearing off, a warming board) separate the two
    groups, so the overhead fitted on one group showed up as error on the other."""
    total = fit + check
    return ["check" if (i + 1) * check // total > i * check // total else "fit" for i in range(total)]


def _validation_archs(job: ProfilingJob, space) -> list[tuple[str, object]]:
    """The job's end-to-end sub-nets, overhead-fit and held-out check ones interleaved.

    Drawn from a generator seeded with the job id, so a retried job measures the same networks."""
    from engine.seeding import make_rngs

    rngs = make_rngs(job.pk)
    purposes = interleaved_purposes(job.overhead_subnets, job.accuracy_subnets)
    return [(purpose, space.sample(rngs.numpy)) for purpose in purposes]


def _ensure_accuracy_models(job: ProfilingJob) -> None:
    """Sub-nets as TorchScript files for the board to time end to end (overhead fit + check).

    Made when the agent first fetches its job rather than in the registration request: scripting
    a few dozen networks takes seconds, which a form submit should not wait for. Idempotent
    (one row per index)."""
    wanted = job.overhead_subnets + job.accuracy_subnets
    if not wanted or job.model_measurements.count() >= wanted:
        return
    import torch

    from engine.export import export_torchscript
    from engine.space import SearchSpace
    from engine.supernet import SuperNet, extract_subnet

    space = SearchSpace.from_dict(job.space)
    existing = set(job.model_measurements.values_list("index", flat=True))
    supernet = SuperNet(space).eval()
    folder = Path(settings.NASWEB_ARTIFACT_DIR) / "profiling" / str(job.pk)
    input_shape = [job.batch_size, space.in_channels, space.image_size, space.image_size]
    for index, (purpose, arch) in enumerate(_validation_archs(job, space)):
        if index in existing:
            continue
        path = folder / f"model-{index}.pt"
        export_torchscript(extract_subnet(supernet, arch).eval(), path, torch.zeros(input_shape))
        ModelMeasurement.objects.get_or_create(
            job=job,
            index=index,
            defaults={
                "purpose": purpose,
                "arch": arch.to_dict(),
                "input_shape": input_shape,
                "file": str(path),
            },
        )


def _fit_and_check(space, table, measured: list[tuple[str, object, float]]) -> None:
    """Fit the overhead on the "fit" networks; report accuracy on the held-out "check" networks."""
    from engine.latency.lut import error_metrics, fit_overhead

    fit = [(arch, ms) for purpose, arch, ms in measured if purpose == "fit"]
    check = [(arch, ms) for purpose, arch, ms in measured if purpose == "check"]
    if fit:
        fit_overhead(space, table, fit)
    if check:
        predicted = [table.predict(space, arch) for arch, _ in check]
        actual = [ms for _, ms in check]
        table.accuracy = {
            **error_metrics(predicted, actual),
            "n": len(check),
            "overhead_fit_networks": len(fit),
            "samples": [
                {"predicted_ms": p, "measured_ms": a, "arch": arch.to_dict()}
                for p, a, (arch, _) in zip(predicted, actual, check, strict=True)
            ],
        }


def _measure_fn_for(device: Device, job: ProfilingJob):
    from engine.latency.measure import LayerTimer

    if device.kind == DeviceKind.SIMULATED:
        from engine.latency.eyeriss import EyerissConfig, EyerissSimulator
        from engine.paths import cache_dir

        config = EyerissConfig(
            rows=device.config.get("array_rows", 12),
            cols=device.config.get("array_cols", 14),
            dataflow=device.config.get("dataflow", "os"),
            clock_mhz=device.config.get("clock_mhz", 200),
        )
        simulator = EyerissSimulator(config, cache_path=cache_dir() / "eyeriss" / f"{config.dataflow}.json")
        return simulator.latency_ms, {"runtime": "scalesim-compute-model", **config.to_dict()}, simulator
    target = "cuda" if device.kind == DeviceKind.LOCAL_GPU else "cpu"
    reference = _speed_reference(job) if target == "cpu" else None  # sets job.reference_ms
    timer = LayerTimer(
        batch_size=job.batch_size, repeats=job.repeats, warmup=job.warmup, threads=job.threads, device=target,
        speed_reference=reference, reference_base_ms=job.reference_ms,
    )  # fmt: skip
    return timer, timer.metadata(), None


def _speed_reference(job: ProfilingJob):
    """This server's CPU changes speed with its neighbours' load: every timing follows a call of a
    fixed reference and is expressed at the reference time calibrated when the job first ran
    (engine.latency.measure.SpeedReference), stored on the job so a resumed job keeps it.
    ``None`` for a job made with ``speed_reference=False`` (raw medians)."""
    from engine.latency.measure import SpeedReference

    if not job.speed_reference:
        return None
    reference = SpeedReference()
    if job.reference_ms is None:
        job.reference_ms = reference.calibrate(threads=job.threads)
        ProfilingJob.objects.filter(pk=job.pk, reference_ms__isnull=True).update(
            reference_ms=job.reference_ms
        )
        job.reference_ms = ProfilingJob.objects.values_list("reference_ms", flat=True).get(pk=job.pk)
    return reference


def profiling_execute(*, job_id: int) -> ProfilingJob:
    """Worker side for local and simulated devices: measure the missing layers (resumable)."""
    from nasweb.core.recovery import job_claim

    job = ProfilingJob.objects.select_related("device").get(pk=job_id)
    lease = job_claim(job)
    if lease is None:
        return job  # finished, or a live worker measures it: this delivery is a duplicate
    with lease:
        return _profile_holding(job, lease)


def _profile_holding(job: ProfilingJob, lease) -> ProfilingJob:
    from engine.latency.lut import LatencyTable, build_lut
    from engine.progress import JobCancelled
    from engine.space import SearchSpace
    from nasweb.core.recovery import LeaseLost

    broadcast_status(job)
    space = SearchSpace.from_dict(job.space)
    measure, metadata, simulator = _measure_fn_for(job.device, job)
    existing = LatencyTable(
        device=job.device.name, entries=dict(job.timings.values_list("key", "ms")), metadata={}
    )
    progress = JobProgress(job, lease=lease)

    def measure_and_store(spec) -> float:
        ms = measure(spec)
        LayerTiming.objects.get_or_create(job=job, key=spec.key, defaults={"ms": ms})
        return ms

    try:
        table = build_lut(
            space,
            measure_and_store,
            progress=progress,
            existing=existing,
            device=job.device.name,
            metadata={**metadata, "search_space": job.space},
        )
        ProfilingJob.objects.filter(pk=job.pk).update(done_layers=len(table))
        isolated = _refine_in_context(job, space, table, progress)
        if simulator is not None:
            simulator.save()
        elif job.overhead_subnets or job.accuracy_subnets:
            # A simulated accelerator has no end-to-end run to compare with: its network latency
            # is by construction the sum of its layers' cycles.
            table = _local_validation(job, space, table, progress, isolated=isolated)
        lease.check()
        _store_table(job, table)
    except LeaseLost:
        return job
    except JobCancelled:
        _finish_profiling(job, lease, JobStatus.CANCELLED, "cancelled by the user")
        return job
    except Exception as exc:
        _finish_profiling(job, lease, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    _finish_profiling(job, lease, JobStatus.SUCCEEDED)
    return job


def _finish_profiling(job: ProfilingJob, lease, status: JobStatus, error: str = "") -> None:
    with transaction.atomic():  # the job's end and its device's status are seen together
        finished = lease.finish(status, error)
        if finished:
            _refresh_device_status(job.device)
    if finished:
        broadcast_status(job)
    job.refresh_from_db()


def times_in_context(device: Device) -> bool:
    """Whether ``device``'s profiling jobs time their layers in context as well (this server's CPU)."""
    return device.kind == DeviceKind.LOCAL_CPU


def _refine_in_context(job: ProfilingJob, space, table, progress):
    """This server's CPU only: time every layer again inside chains of layers and use those
    timings (engine.latency.context); returns a copy of the isolated table (for _keep_better),
    None where nothing was timed in context. Not resumable on its own: it takes seconds, and a
    job killed during it finds every isolated timing stored and runs it again."""
    from engine.latency import context
    from engine.seeding import make_rngs

    if not times_in_context(job.device) or job.context_repeats < 1 or not context.supports(space):
        return None
    isolated = table.copy()
    # Seeded by the job, so a resumed job times the same chains.
    timer = context.ChainTimer(
        repeats=max(1, min(job.repeats, 5)),
        warmup=min(job.warmup, 2),
        threads=job.threads,
        speed_reference=_speed_reference(job),
        reference_base_ms=job.reference_ms if job.speed_reference else None,
    )
    context.refine_in_context(
        space, table, timer, make_rngs(job.pk).numpy, repeats_per_key=job.context_repeats, progress=progress
    )
    return isolated


def _keep_better(space, in_context, isolated, measured: list[tuple[str, object, float]]):
    """The table closer to the sub-nets the job timed end to end: in-context or isolated entries.

    Timing layers in context made tables far more accurate on an AMD EPYC and less accurate on
    an Intel Xeon (docs/BENCHMARKS.md, "Layers timed in context"), so the job does not assume:
    both tables are fitted on its fit sub-nets (_fit_and_check) and scored on every sub-net it
    measured (fit and check: the fit alone may be all there is); the lower mean absolute
    percentage error wins, a tie keeps the in-context one. Both scores stay in the table's
    ``metadata["context"]["choice"]``."""
    from engine.latency.lut import error_metrics

    actual = [ms for _, _, ms in measured]
    scores = {
        name: error_metrics([table.predict(space, arch) for _, arch, _ in measured], actual)
        for name, table in (("in_context", in_context), ("isolated", isolated))
    }
    kept = "in_context" if scores["in_context"]["mape"] <= scores["isolated"]["mape"] else "isolated"
    summary = in_context.metadata["context"]
    summary["choice"] = {
        "kept": kept,
        "networks": len(measured),
        **{name: {"within_10pct": m["within_10pct"], "mape": m["mape"]} for name, m in scores.items()},
    }
    if kept == "in_context":
        return in_context
    isolated.metadata["context"] = summary
    return isolated


def _local_validation(job, space, table, progress, isolated=None):
    """Time the job's fit and check sub-nets end to end on this machine (see _fit_and_check) and
    return the table to store: ``table``, or with ``isolated`` (the entries before the context
    phase) the better of the two (_keep_better).

    On the CPU at the same reference speed as the table's entries."""
    from engine.latency.measure import ArchTimer
    from engine.supernet import SuperNet, extract_subnet

    supernet = SuperNet(space).eval()
    target = "cuda" if job.device.kind == DeviceKind.LOCAL_GPU else "cpu"
    reference = _speed_reference(job) if target == "cpu" else None  # sets job.reference_ms
    timer = ArchTimer(
        space, network_fn=lambda arch: extract_subnet(supernet, arch).eval(), batch_size=job.batch_size,
        repeats=max(job.repeats, 20), warmup=job.warmup, threads=job.threads, device=target,
        speed_reference=reference, reference_base_ms=job.reference_ms,
    )  # fmt: skip
    networks = _validation_archs(job, space)
    measured = []
    for done, (purpose, arch) in enumerate(networks, start=1):
        measured.append((purpose, arch, timer(arch)))
        progress({"kind": "profile", "phase": "validation", "current": done, "total": len(networks),
                  "message": f"end-to-end sub-net {done}/{len(networks)}"})  # fmt: skip
    _fit_and_check(space, table, measured)
    if isolated is None or not measured:
        return table
    _fit_and_check(space, isolated, measured)
    return _keep_better(space, table, isolated, measured)


def _store_table(job: ProfilingJob, table) -> LatencyTableRecord:
    with transaction.atomic():
        stored = ProfilingJob.objects.select_for_update().get(pk=job.pk)
        if stored.result_id is not None:  # a worker stored it and died before marking the job done
            return stored.result
        record = LatencyTableRecord.objects.create(
            device=job.device,
            space=job.space,
            space_key=job.space_key,
            table=table.to_dict(),
            entries_count=len(table),
            accuracy=table.accuracy,
        )
        ProfilingJob.objects.filter(pk=job.pk).update(result=record)
    return record


def _refresh_device_status(device: Device) -> None:
    device.refresh_from_db()
    if device.status == DeviceStatus.REVOKED:
        return
    if ProfilingJob.objects.filter(device=device).active().exists():
        status = DeviceStatus.PROFILING
    elif device.latency_tables.exists():
        status = DeviceStatus.READY
    else:
        last = ProfilingJob.objects.filter(device=device).order_by("-created_at").first()
        status = DeviceStatus.FAILED if last and last.status == JobStatus.FAILED else DeviceStatus.NEW
    Device.objects.filter(pk=device.pk).update(status=status)


@dataclass(frozen=True)
class SpaceTables:
    """A device's newest table for one search space, and how many older ones of that space exist."""

    latest: LatencyTableRecord
    older: int
    description: str


def describe_space(space_dict: dict[str, Any]) -> str:
    from engine.space import SearchSpace

    try:
        return SearchSpace.from_dict(space_dict).describe()
    except (TypeError, ValueError, KeyError):  # a row from an older version, or edited by hand
        return "a search space this version cannot read"


def tables_by_space(device: Device) -> list[SpaceTables]:
    """One entry per search space the device has been profiled for, newest first. A table serves
    one space only (a board profiled for Omniglot 20-way cannot price a Mini-ImageNet super-net),
    so the device page lists every space, not only the latest table. Uses the tables prefetched by
    ``Device.objects.with_table_summaries()`` where a list did so (no query per device)."""
    prefetched = getattr(device, "table_summaries", None)
    records = prefetched if prefetched is not None else device.latency_tables.defer("table")
    found: dict[str, SpaceTables] = {}
    for record in records:
        seen = found.get(record.space_key)
        if seen is None:
            found[record.space_key] = SpaceTables(record, 0, describe_space(record.space))
        else:
            found[record.space_key] = SpaceTables(seen.latest, seen.older + 1, seen.description)
    return list(found.values())


def profiling_space_choices(
    device: Device, tables: list[SpaceTables] | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(space key, label, space dict) a re-profiling may choose: every space the device has a
    table for, newest first, then the dashboard's default space if it has none for it yet.
    ``tables``: the device's ``tables_by_space``, where the caller has it already."""
    if tables is None:
        tables = tables_by_space(device)
    choices = [(entry.latest.space_key, entry.description, entry.latest.space) for entry in tables]
    default = default_profiling_space().to_dict()
    default_key = space_key(default)
    if all(key != default_key for key, _, _ in choices):
        choices.append((default_key, f"{describe_space(default)} (the default)", default))
    return choices


def chosen_table(device: Device, table_id: str | None) -> LatencyTableRecord | None:
    """The table ``table_id`` names among ``device``'s (DoesNotExist for anything else, a
    malformed id included), or the newest one when no id is given."""
    if table_id is None:
        return device.latency_tables.first()
    if not str(table_id).isdigit():
        raise LatencyTableRecord.DoesNotExist(f"{table_id!r} is not a latency table id")
    return device.latency_tables.get(pk=int(table_id))


# --- the agent protocol ---------------------------------------------------------------------


def _job_for_token(token: DeviceToken, job_id: str) -> ProfilingJob:
    try:
        pk = int(job_id)
    except (TypeError, ValueError):
        raise AgentProtocolError(404, f"no job {job_id!r}") from None
    job = ProfilingJob.objects.filter(pk=pk, device_id=token.device_id).first()
    if job is None:  # unknown, or another device's job: indistinguishable on purpose
        raise AgentProtocolError(404, f"no job {job_id!r} for this device")
    return job


def _valid_ms(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
        and value < 3.6e6  # an hour for one layer is a broken clock, not a measurement
    )


def agent_current_job(*, token: DeviceToken) -> dict[str, Any] | None:
    job = ProfilingJob.objects.filter(device_id=token.device_id).active().order_by("created_at").first()
    if job is None:
        return None
    if job.status == JobStatus.QUEUED:
        job.mark_running()
        broadcast_status(job)
    _ensure_accuracy_models(job)
    models = list(job.model_measurements.all())
    return {
        "job_id": str(job.pk),
        "batch_size": job.batch_size,
        "repeats": job.repeats,
        "warmup": job.warmup,
        "threads": job.threads or 1,
        # Without the key the agent times raw medians (as it does for a server that predates it).
        **({"reference_ms": job.reference_ms} if job.speed_reference else {}),
        "layers": job.layers,
        "done_keys": list(job.timings.values_list("key", flat=True)),
        "models": [
            {
                "model_id": str(m.index),
                "url": f"/api/agent/jobs/{job.pk}/models/{m.index}/file",
                "input_shape": m.input_shape,
            }
            for m in models
        ],
        "done_models": [str(m.index) for m in models if m.measured_ms is not None],
    }


def agent_post_results(*, token: DeviceToken, job_id: str, payload: Any) -> dict[str, Any]:
    job = _job_for_token(token, job_id)
    if not isinstance(payload, dict):
        raise AgentProtocolError(400, "body must be a JSON object")
    unknown_fields = set(payload) - {"batch_id", "results"}
    if unknown_fields:
        raise AgentProtocolError(400, f"unknown fields: {sorted(unknown_fields)}")
    try:
        batch_id = uuid.UUID(str(payload.get("batch_id", "")))
    except ValueError:
        raise AgentProtocolError(400, "batch_id must be a UUID") from None
    results = payload.get("results")
    if not isinstance(results, list) or not results:
        raise AgentProtocolError(400, "results must be a non-empty list")
    if len(results) > MAX_RESULTS_PER_BATCH:
        raise AgentProtocolError(400, f"at most {MAX_RESULTS_PER_BATCH} results per batch")
    known = {layer["key"] for layer in job.layers}
    seen: dict[str, float] = {}
    for index, item in enumerate(results):
        if not isinstance(item, dict) or set(item) != {"key", "ms"}:
            raise AgentProtocolError(400, f"results[{index}] must be an object with exactly 'key' and 'ms'")
        key, ms = item["key"], item["ms"]
        if not isinstance(key, str) or key not in known:
            raise AgentProtocolError(400, f"results[{index}]: {key!r} is not a layer key of job {job.pk}")
        if not _valid_ms(ms):
            raise AgentProtocolError(
                400, f"results[{index}]: ms={ms!r} is not a finite positive number of ms"
            )
        if key in seen:
            raise AgentProtocolError(400, f"results[{index}]: key {key!r} appears twice in this batch")
        seen[key] = float(ms)
    if job.is_finished:
        # Validated first so that garbage is a 400 even after the end; a late valid replay is harmless.
        if AgentBatch.objects.filter(job=job, batch_id=batch_id).exists():
            return _results_answer(job, duplicate=True)
        raise AgentProtocolError(409, f"job {job.pk} is {job.status}")
    try:
        with transaction.atomic():
            AgentBatch.objects.create(job=job, batch_id=batch_id, accepted=len(seen))
            existing = set(LayerTiming.objects.filter(job=job, key__in=seen).values_list("key", flat=True))
            LayerTiming.objects.bulk_create(
                [LayerTiming(job=job, key=key, ms=ms) for key, ms in seen.items() if key not in existing]
            )
    except IntegrityError:
        return _results_answer(job, duplicate=True)  # the same batch raced in twice
    done = job.timings.count()
    ProfilingJob.objects.filter(pk=job.pk).update(done_layers=done)
    job.done_layers = done
    JobProgress(job, db_interval_s=0)(
        {
            "kind": "profile",
            "current": done,
            "total": job.total_layers,
            "message": f"{done}/{job.total_layers} layers",
        }
    )
    return _results_answer(job)


def _results_answer(job: ProfilingJob, *, duplicate: bool = False) -> dict[str, Any]:
    answer = {"stored": job.timings.count(), "done": job.timings.count(), "total": job.total_layers}
    if duplicate:
        answer["duplicate"] = True
    return answer


def agent_model_file(*, token: DeviceToken, job_id: str, model_id: str) -> Path:
    job = _job_for_token(token, job_id)
    measurement = _model_of(job, model_id)
    path = Path(measurement.file)
    if not path.is_file():
        raise AgentProtocolError(404, f"model {model_id} file is missing on the server")
    return path


def _model_of(job: ProfilingJob, model_id: str) -> ModelMeasurement:
    try:
        index = int(model_id)
    except (TypeError, ValueError):
        raise AgentProtocolError(404, f"no model {model_id!r}") from None
    measurement = job.model_measurements.filter(index=index).first()
    if measurement is None:
        raise AgentProtocolError(404, f"no model {model_id!r} in job {job.pk}")
    return measurement


def agent_post_reference(*, token: DeviceToken, job_id: str, payload: Any) -> dict[str, Any]:
    """The board's calibrated speed-reference time; the first one posted for a job is kept.

    Every timing of the job is expressed at it, so a restarted agent that calibrates again (and
    gets another figure) must not change it: the answer is always the stored one."""
    job = _job_for_token(token, job_id)
    if (
        not isinstance(payload, dict)
        or set(payload) != {"reference_ms"}
        or not _valid_ms(payload["reference_ms"])
    ):
        raise AgentProtocolError(400, 'body must be {"reference_ms": <finite positive number>}')
    if job.is_finished:
        raise AgentProtocolError(409, f"job {job.pk} is {job.status}")
    if not job.speed_reference:
        raise AgentProtocolError(409, f"job {job.pk} times raw medians, without a speed reference")
    ProfilingJob.objects.filter(pk=job.pk, reference_ms__isnull=True).update(
        reference_ms=float(payload["reference_ms"])
    )
    return {"reference_ms": ProfilingJob.objects.values_list("reference_ms", flat=True).get(pk=job.pk)}


def agent_post_model_result(
    *, token: DeviceToken, job_id: str, model_id: str, payload: Any
) -> dict[str, Any]:
    job = _job_for_token(token, job_id)
    measurement = _model_of(job, model_id)
    if not isinstance(payload, dict) or set(payload) != {"ms"} or not _valid_ms(payload["ms"]):
        raise AgentProtocolError(400, 'body must be {"ms": <finite positive number>}')
    if job.is_finished:
        raise AgentProtocolError(409, f"job {job.pk} is {job.status}")
    measurement.measured_ms = float(payload["ms"])
    measurement.save(update_fields=["measured_ms"])
    return {"stored": True}


def agent_complete(*, token: DeviceToken, job_id: str, payload: Any) -> dict[str, Any]:
    from engine.latency.lut import LatencyTable
    from engine.latency.measure import reference_description
    from engine.space import Arch, SearchSpace

    job = _job_for_token(token, job_id)
    if not isinstance(payload, dict):
        raise AgentProtocolError(400, "body must be a JSON object")
    unknown_fields = set(payload) - {"call_overhead_ms", "metadata"}
    if unknown_fields:
        raise AgentProtocolError(400, f"unknown fields: {sorted(unknown_fields)}")
    if job.status == JobStatus.SUCCEEDED:
        return {"complete": True}
    if job.is_finished:
        raise AgentProtocolError(409, f"job {job.pk} is {job.status}")
    overhead = payload.get("call_overhead_ms", 0.0)
    # Zero is a fair overhead (a fast board); above zero it must be a plausible time, like a layer's.
    if isinstance(overhead, bool) or not (overhead == 0 or _valid_ms(overhead)):
        raise AgentProtocolError(
            400, "call_overhead_ms must be a finite number of ms, >= 0 and under an hour"
        )
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict) or len(json.dumps(metadata)) > 10_000:
        raise AgentProtocolError(400, "metadata must be a JSON object under 10 kB")
    entries = dict(job.timings.values_list("key", "ms"))
    missing = [layer["key"] for layer in job.layers if layer["key"] not in entries]
    missing_models = [str(m.index) for m in job.model_measurements.all() if m.measured_ms is None]
    if missing or missing_models:
        raise AgentProtocolError(
            409, "job is incomplete", missing=missing[:100] + [f"model:{m}" for m in missing_models]
        )
    table = LatencyTable(
        device=job.device.name,
        entries=entries,
        overhead_ms=float(overhead),
        metadata={
            **{str(k): v for k, v in metadata.items()},
            "search_space": job.space,
            "batch_size": job.batch_size,
            "repeats": job.repeats,
            "warmup": job.warmup,
            "date": timezone.now().isoformat(),
            "source": "agent",
            "speed_reference": {"workload": reference_description(), "base_ms": job.reference_ms}
            if job.reference_ms is not None
            else None,
        },
    )
    measured = [m for m in job.model_measurements.all() if m.measured_ms is not None]
    if measured:
        space = SearchSpace.from_dict(job.space)
        _fit_and_check(space, table, [(m.purpose, Arch.from_dict(m.arch), m.measured_ms) for m in measured])
    _store_table(job, table)
    job.refresh_from_db()
    with transaction.atomic():  # the job's end and its device's status are seen together
        job.mark_finished(JobStatus.SUCCEEDED)
        _refresh_device_status(job.device)
    broadcast_status(job)
    return {"complete": True}
