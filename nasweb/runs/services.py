"""Run services: start meta-training and adaption jobs, execute them in workers, keep their results.

Workers call ``*_execute(run_id=...)``. Every execute function is idempotent and resumable: a
finished run is left alone, and a run whose worker died continues from its checkpoint (meta-
training) or its last generation (adaption) when the task is delivered again.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from devices.models import Device, DeviceKind, DeviceStatus, LatencyTableRecord
from engine import cpu  # torch-free
from nasweb.core.models import JobStatus
from nasweb.core.progress import JobProgress, broadcast_status
from nasweb.core.recovery import LeaseLost, job_claim
from nasweb.runs.models import (
    MAX_DEPTH_ELITES,
    MAX_PATIENCE,
    AdaptedModel,
    AdaptionRun,
    MetaTrainingRun,
    Method,
    SupportSet,
)

HISTORY_LIMIT = 2000
METHOD_BACKBONE = {Method.MAMLPP: "maml", Method.MAML: "maml", Method.METANAS: "darts"}


class RunInputError(ValueError):
    """A run request that cannot be carried out; the message is shown to the user."""


def _run_dir(kind: str, pk: int) -> Path:
    return Path(settings.NASWEB_ARTIFACT_DIR) / "runs" / f"{kind}-{pk}"


class HistoryProgress(JobProgress):
    """JobProgress that also keeps a thinned history on the row, so a page opened mid-run can
    draw the curves so far before its websocket delivers the rest."""

    def __init__(
        self, job, *, keep, db_interval_s: float = 1.0, flush_interval_s: float = 2.0, lease=None
    ) -> None:
        super().__init__(job, db_interval_s=db_interval_s, lease=lease)
        self.keep = keep
        self.flush_interval_s = flush_interval_s
        self.pending: list[dict] = []
        self._last_flush = 0.0

    def __call__(self, event) -> None:
        import time

        point = self.keep(event)
        if point is not None:
            self.pending.append(point)
            if time.monotonic() - self._last_flush >= self.flush_interval_s:
                self.flush()
        super().__call__(event)

    def flush(self) -> None:
        import time

        self._last_flush = time.monotonic()
        if not self.pending:
            return
        model = type(self.job)
        with transaction.atomic():
            row = model.objects.select_for_update().get(pk=self.job.pk)
            history = row.history + self.pending
            if len(history) > HISTORY_LIMIT:  # keep the first point and an even thinning of the rest
                step = len(history) / HISTORY_LIMIT
                history = [history[int(i * step)] for i in range(HISTORY_LIMIT - 1)] + [history[-1]]
            model.objects.filter(pk=row.pk).update(history=history)
        self.pending = []


# --- meta-training --------------------------------------------------------------------------


def metatrain_start(
    *,
    owner,
    method: str = Method.HMETANAS,
    dataset: str = "omniglot",
    ways: int = 5,
    shots: int = 1,
    backbone: str = "vgg9",
    preset: str = "tiny",
    iterations: int | None = None,
    seed: int = 0,
    name: str = "",
) -> MetaTrainingRun:
    from engine.meta.runs import RunSpec, check_dataset, default_strategy

    if method not in Method.values:
        raise RunInputError(f"unknown method {method!r}")
    backbone = METHOD_BACKBONE.get(method, backbone)
    try:
        if method == Method.METANAS:
            spec = _metanas_spec(
                dataset=dataset, ways=ways, shots=shots, preset=preset, iterations=iterations, seed=seed
            )
        else:
            spec = RunSpec(
                dataset=dataset,
                ways=ways,
                shots=shots,
                backbone=backbone,
                preset=preset,
                iterations=iterations,
                seed=seed,
                threads=settings.NASWEB_TORCH_THREADS,
                algorithm="maml" if method == Method.MAML else "mamlpp",
                device=settings.NASWEB_TRAIN_DEVICE,
                strategy=default_strategy(settings.NASWEB_TRAIN_DEVICE),
            )
        check_dataset(dataset, ways)  # a form error now, not a failed job later (any method)
    except ValueError as exc:  # RunSpecError, MetaNasRunError, MetaNasConfigError
        raise RunInputError(str(exc)) from exc
    spec_dict = spec.to_dict()
    with transaction.atomic():
        run = MetaTrainingRun.objects.create(
            owner=owner,
            name=name,
            method=method,
            dataset=dataset,
            ways=ways,
            shots=shots,
            backbone=backbone,
            preset=preset,
            spec=spec_dict,
        )
        run.out_dir = str(_run_dir("metatrain", run.pk))
        run.save(update_fields=["out_dir"])
        transaction.on_commit(lambda: _enqueue("runs.meta_train", run, queue="train"))
    return run


def metatrain_rerun(run: MetaTrainingRun, *, owner) -> MetaTrainingRun:
    """A new run with every setting of ``run`` (its length and seed too), owned by ``owner``."""
    spec = run.spec or {}
    return metatrain_start(
        owner=owner, method=run.method, dataset=run.dataset, ways=run.ways, shots=run.shots,
        backbone=run.backbone, preset=run.preset, name=f"{run} (re-run)", seed=spec.get("seed", 0),
        iterations=spec.get("meta_epochs" if run.method == Method.METANAS else "iterations"),
    )  # fmt: skip


def _metanas_spec(*, dataset: str, ways: int, shots: int, preset: str, iterations: int | None, seed: int):
    """A MetaNAS run: ``iterations`` are meta-epochs (each one REPTILE update over a meta-batch of tasks)."""
    from engine.metanas.service import MetaNasRunSpec

    return MetaNasRunSpec(
        dataset=dataset,
        ways=ways,
        shots=shots,
        preset=preset,
        meta_epochs=iterations,
        seed=seed,
        threads=settings.NASWEB_TORCH_THREADS,
    )


def _enqueue(task_name: str, run, *, queue: str) -> None:
    from nasweb.celery import app

    result = app.send_task(task_name, args=[run.pk], queue=queue)
    type(run).objects.filter(pk=run.pk).update(celery_task_id=result.id)


def _spec_of(run: MetaTrainingRun):
    from engine.meta.runs import RunSpec

    return RunSpec.from_dict(run.spec)


def _metatrain_point(event) -> dict | None:
    if event.get("kind") != "meta_train":
        return None
    keys = ("current", "total", "loss", "accuracy", "it_per_s", "eta_s", "epoch", "p_largest")
    return {k: event.get(k) for k in keys if k in event}


def metatrain_execute(*, run_id: int) -> MetaTrainingRun:
    run = MetaTrainingRun.objects.get(pk=run_id)
    lease = job_claim(run)
    if lease is None:
        return run  # finished, or a live worker executes it: this delivery is a duplicate
    with lease:
        resumed = checkpoint_path(run).exists()
        broadcast_status(run)
        progress = HistoryProgress(run, keep=_metatrain_point, lease=lease)

        def train() -> None:
            if run.is_metanas:
                from engine.metanas.service import MetaNasRunSpec, execute_metanas_training

                summary = execute_metanas_training(
                    MetaNasRunSpec.from_dict(run.spec), run.out_dir, resume=resumed, progress=progress
                )
                space = None
            else:
                from engine.meta.runs import build_space
                from engine.meta.service import execute_meta_training

                spec = _spec_of(run)
                summary = execute_meta_training(spec, run.out_dir, resume=resumed, progress=progress)
                space = build_space(spec)
            progress.flush()
            lease.check()
            MetaTrainingRun.objects.filter(pk=run.pk, lease_owner=lease.owner).update(
                summary={**summary, "resumed": resumed},
                space=space.to_dict() if space is not None else None,
            )

        return _run_to_the_end(run, lease, progress, train)


def _finish(run, lease, status: JobStatus, error: str = ""):
    """End the run if this worker still holds it (else its successor will)."""
    if lease.finish(status, error):
        broadcast_status(run)
    run.refresh_from_db()
    return run


def _run_to_the_end(run, lease, progress, work: Callable[[], None], *, input_errors: bool = False):
    """Call ``work`` under the lease and record how the run ended. A lost lease writes nothing (the
    successor owns the run); with ``input_errors`` a ValueError is bad input discovered late and
    fails the run with its own message, any other error fails it and goes on to Celery."""
    from engine.progress import JobCancelled

    try:
        work()
    except LeaseLost:
        return run
    except JobCancelled:
        progress.flush()
        return _finish(run, lease, JobStatus.CANCELLED, "cancelled by the user")
    except Exception as exc:
        progress.flush()
        if input_errors and isinstance(exc, ValueError):
            return _finish(run, lease, JobStatus.FAILED, str(exc))
        _finish(run, lease, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    return _finish(run, lease, JobStatus.SUCCEEDED)


def checkpoint_path(run: MetaTrainingRun) -> Path:
    if run.is_metanas:
        from engine.metanas.train import CHECKPOINT_NAME as METANAS_CHECKPOINT

        return Path(run.out_dir) / METANAS_CHECKPOINT
    from engine.meta.train import CHECKPOINT_NAME

    return Path(run.out_dir) / CHECKPOINT_NAME


# --- support sets ---------------------------------------------------------------------------


def support_set_upload(
    *, owner, name: str, uploaded_file, channels: int = 1, image_size: int = 28, ways: int | None = None
) -> SupportSet:
    """Check an uploaded zip of class folders (zip-slip, bombs, non-images) and keep it.

    ``ways``: the class count the zip must have, checked from its directory before any image is
    decoded. Nothing is kept unless every check passed; messages name the upload, not our paths.
    """
    import collections
    import tempfile

    from engine.data import DatasetError, load_support_set
    from engine.data.image_folder import ArchiveLimits, read_image_folder_layout

    if uploaded_file.size > settings.NASWEB_MAX_UPLOAD_BYTES:
        raise RunInputError(f"the file is larger than {settings.NASWEB_MAX_UPLOAD_BYTES} bytes")
    limits = ArchiveLimits(
        max_total_bytes=settings.NASWEB_MAX_UNZIPPED_BYTES, max_members=settings.NASWEB_MAX_UPLOAD_FILES
    )
    folder = Path(settings.MEDIA_ROOT) / "support" / str(owner.pk)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=folder, suffix=".zip.part")
    temp = Path(temp_name)
    shown = uploaded_file.name or "the upload"
    try:
        with open(handle, "wb") as out:
            for chunk in uploaded_file.chunks():
                out.write(chunk)
        if not zipfile.is_zipfile(temp):
            raise RunInputError("the upload is not a zip file of class folders")
        try:
            classes = len(read_image_folder_layout(temp, limits))
            if ways is not None and classes != ways:
                raise RunInputError(
                    f"the support set has {classes} classes but the super-net is {ways}-way; "
                    f"upload {ways} class folders"
                )
            support = load_support_set(temp, image_size=image_size, channels=channels, limits=limits)
        except DatasetError as exc:
            raise RunInputError(str(exc).replace(str(temp), shown)) from exc
        counts = collections.Counter(int(label) for label in support.y.tolist())
        with transaction.atomic():
            row = SupportSet.objects.create(
                owner=owner,
                name=name or uploaded_file.name,
                path="",
                class_names=list(support.class_names),
                images_per_class=[counts[i] for i in range(len(support.class_names))],
            )
            final = folder / f"support-{row.pk}.zip"
            temp.replace(final)
            row.path = str(final)
            row.save(update_fields=["path"])
        return row
    finally:
        temp.unlink(missing_ok=True)


# --- adaption -------------------------------------------------------------------------------


def _check_whole_number(name: str, value, most: int, *, unit: str = "") -> None:
    """``value`` must be an int (not a bool) from 0 to ``most``, else a RunInputError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise RunInputError(f"{name} must be a whole number{unit} from 0 to {most}")


def adaption_start(
    *,
    owner,
    supernet: MetaTrainingRun,
    device: Device,
    constraint: str,
    budgets: list[float],
    preset: str = "tiny",
    support_set: SupportSet | None = None,
    name: str = "",
    patience: int = 0,
    search_metric: str = "",
    deepen: str = "",
    search_precision: str = "",
    depth_elites: int = 0,
) -> AdaptionRun:
    """Queue an adaption. ``search_metric``, ``deepen``, ``search_precision`` and ``depth_elites``
    override the preset's (blank or 0: keep it)."""
    import math

    from engine.adaption_presets import (
        ADAPTION_PRESETS,
        DEEPEN_MODES,
        FINAL_METRICS,
        MAX_SPACE_DEPTHS,
        SEARCH_PRECISIONS,
        TOP_FRACTION,
        most_depth_elites,
    )
    from engine.search.constraints import Constraint, ConstraintError

    if supernet.status != JobStatus.SUCCEEDED or not supernet.is_adaptable:
        raise RunInputError("choose a finished H-Meta-NAS super-net or MetaNAS meta-training run")
    if not budgets:
        raise RunInputError("give at least one budget")
    _check_whole_number("patience", patience, MAX_PATIENCE, unit=" of generations")
    if patience and not supernet.is_supernet:
        raise RunInputError("patience stops the architecture search of a super-net; a MetaNAS run has none")
    if search_metric not in ("", *FINAL_METRICS):
        raise RunInputError(f"search_metric must be one of {FINAL_METRICS} or blank (the preset's)")
    if deepen not in ("", *DEEPEN_MODES):
        raise RunInputError(f"deepen must be one of {DEEPEN_MODES} or blank (the preset's)")
    if search_precision not in ("", *SEARCH_PRECISIONS):
        raise RunInputError(f"search_precision must be one of {SEARCH_PRECISIONS} or blank (the preset's)")
    _check_whole_number("depth_elites", depth_elites, MAX_DEPTH_ELITES)
    preset_values = ADAPTION_PRESETS.get(preset)
    if depth_elites and preset_values is not None:
        most = most_depth_elites(preset_values.pool_size, TOP_FRACTION, MAX_SPACE_DEPTHS)
        if depth_elites > most:
            raise RunInputError(
                f"depth_elites {depth_elites} would leave fewer than half of the {preset} preset's pool "
                f"of {preset_values.pool_size} to new sub-nets; at most {most} with this preset"
            )
    if (search_metric or deepen or search_precision or depth_elites) and not supernet.is_supernet:
        raise RunInputError(
            "search_metric, deepen, search_precision and depth_elites steer the architecture search "
            "of a super-net; a MetaNAS run has none"
        )
    if search_precision == "bfloat16":
        if settings.NASWEB_ADAPT_DEVICE != "cpu":
            raise RunInputError(
                f"bfloat16 search arithmetic is a CPU option; this server searches on "
                f"{settings.NASWEB_ADAPT_DEVICE} (NASWEB_ADAPT_DEVICE) in float32"
            )
        if not cpu.bfloat16_flags():
            raise RunInputError(
                "this server's CPU has no bfloat16 instructions (avx512_bf16, amx_bf16): bfloat16 "
                "would be emulated and slower than float32; choose float32"
            )
    for budget in budgets:
        if not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
            raise RunInputError(f"budget {budget!r} must be a finite positive number")
        try:
            Constraint(constraint, float(budget))
        except ConstraintError as exc:
            raise RunInputError(str(exc)) from exc
    if support_set is not None and len(support_set.class_names) != supernet.ways:
        raise RunInputError(
            f"the support set has {len(support_set.class_names)} classes but the super-net is "
            f"{supernet.ways}-way; upload {supernet.ways} class folders"
        )
    if (
        constraint == "latency_ms"
        and supernet.is_supernet  # MetaNAS models are measured end to end, not from a LUT
        and device.kind == DeviceKind.REMOTE
        and _table_for(device, supernet) is None
    ):
        raise RunInputError(
            f"{device.name} has no latency table for this super-net's search space yet: profile it "
            "for this super-net first (its agent must run), or use a params/MACs budget"
        )
    with transaction.atomic():
        run = AdaptionRun.objects.create(
            owner=owner,
            name=name,
            supernet=supernet,
            device=device,
            constraint=constraint,
            budgets=[float(b) for b in budgets],
            preset=preset,
            patience=patience,
            search_metric=search_metric,
            deepen=deepen,
            search_precision=search_precision,
            depth_elites=depth_elites,
            support_set=support_set,
        )
        run.out_dir = str(_run_dir("adaption", run.pk))
        run.save(update_fields=["out_dir"])
        transaction.on_commit(lambda: _enqueue("runs.adapt", run, queue="adapt"))
    return run


def adaption_rerun(run: AdaptionRun, *, owner) -> AdaptionRun:
    """A new adaption with every setting of ``run``, owned by ``owner``."""
    return adaption_start(
        owner=owner, supernet=run.supernet, device=run.device, constraint=run.constraint,
        budgets=run.budgets, preset=run.preset, support_set=run.support_set, patience=run.patience,
        search_metric=run.search_metric, deepen=run.deepen, search_precision=run.search_precision,
        depth_elites=run.depth_elites, name=f"{run} (re-run)",
    )  # fmt: skip


def adaption_start_with_upload(
    *, owner, supernet: MetaTrainingRun, device: Device, support_upload=None, **options
) -> AdaptionRun:
    """``adaption_start`` with an optional uploaded support zip: both are kept, or neither."""
    if support_upload is None:
        return adaption_start(owner=owner, supernet=supernet, device=device, **options)
    space = supernet.space or {}
    support = None
    try:
        with transaction.atomic():
            support = support_set_upload(
                owner=owner, name=support_upload.name, uploaded_file=support_upload,
                channels=space.get("in_channels", 1), image_size=space.get("image_size", 28),
                ways=supernet.ways,
            )  # fmt: skip
            return adaption_start(
                owner=owner, supernet=supernet, device=device, support_set=support, **options
            )
    except BaseException:
        if support is not None:  # the row was rolled back; its file must go too
            Path(support.path).unlink(missing_ok=True)
        raise


def profilable_devices(user, run: MetaTrainingRun) -> list[dict]:
    """Devices this user may profile for ``run``'s search space, and whether each has its table."""
    from devices.services import may_profile, space_key

    if not (run.is_supernet and run.status == JobStatus.SUCCEEDED and run.space):
        return []
    devices = [
        device
        for device in Device.objects.visible_to(user).exclude(status=DeviceStatus.REVOKED).order_by("name")
        if may_profile(user, device)
    ]
    with_table = set(
        LatencyTableRecord.objects.filter(device__in=devices, space_key=space_key(run.space)).values_list(
            "device_id", flat=True
        )
    )
    return [{"device": device, "has_table": device.pk in with_table} for device in devices]


def profile_device_for_supernet(*, user, run: MetaTrainingRun, device: Device):
    """Start profiling ``device`` over ``run``'s search space (a board registered for another
    space - another dataset, N-way or preset - cannot otherwise serve latency budgets for this
    super-net). The device preset of the run's preset sets repeats and checks."""
    from devices import services as device_services
    from engine.space import SearchSpace

    if not run.is_supernet or run.status != JobStatus.SUCCEEDED or not run.space:
        raise RunInputError("only a finished H-Meta-NAS super-net has a search space to profile")
    if not device_services.may_profile(user, device):
        raise RunInputError(f"only {device.name}'s owner (or staff, for built-in devices) can profile it")
    try:
        space = SearchSpace.from_dict(run.space)
    except (TypeError, ValueError, KeyError) as exc:  # a row edited by hand, or from an old version
        raise RunInputError(f"this run's stored search space cannot be read ({exc})") from exc
    settings_of_preset = device_services.PROFILING_PRESETS.get(
        run.preset, device_services.PROFILING_PRESETS["paper"]
    )
    try:
        return device_services.profiling_start(device=device, owner=user, space=space, **settings_of_preset)
    except ValueError as exc:  # a revoked device
        raise RunInputError(str(exc)) from exc


def _table_for(device: Device, supernet: MetaTrainingRun):
    from devices.services import space_key

    if not supernet.space:
        return None
    return device.latency_tables.filter(space_key=space_key(supernet.space)).first()


def _ensure_table(run: AdaptionRun, progress) -> Path | None:
    """The device's LUT for the super-net's space as a file, or None.

    A latency budget needs one: local devices are profiled on demand. Under a params or MACs budget
    a table the device already has still gives every chosen model its predicted latency on that
    device (the engine costs each candidate on it), but none is profiled just for that."""
    from devices import services as device_services
    from engine.space import SearchSpace

    table = _table_for(run.device, run.supernet)
    if table is None and run.constraint != "latency_ms":
        return None
    if table is None:
        if run.device.kind == DeviceKind.REMOTE:
            raise RunInputError(
                f"{run.device.name} has no latency table for this super-net's search space: profile it for "
                f"this super-net from the super-net's page"
            )
        progress({"kind": "adapt_stage", "stage": "profile", "current": 0, "total": 1,
                  "message": f"profiling {run.device.name} for this search space"})  # fmt: skip
        job = device_services.profiling_start(
            device=run.device, owner=run.owner, space=SearchSpace.from_dict(run.supernet.space), repeats=10,
            warmup=2, threads=settings.NASWEB_TORCH_THREADS, overhead_subnets=5, enqueue=False,
        )  # fmt: skip
        # Inline in this worker: the adaption cannot go on without it.
        device_services.profiling_execute(job_id=job.pk)
        table = _table_for(run.device, run.supernet)
        if table is None:
            raise RunInputError(f"profiling {run.device.name} did not produce a latency table")
    path = Path(run.out_dir) / "lut.json"
    from engine.latency.lut import LatencyTable

    LatencyTable.from_dict(table.table).save(path)
    return path


def _baseline_checkpoints(run: AdaptionRun) -> tuple[str, ...]:
    """Finished MAML / MAML++ runs of the same task the user can see: measured reference points."""
    baselines = MetaTrainingRun.objects.visible_to(run.owner) if run.owner else MetaTrainingRun.objects.none()
    baselines = baselines.filter(
        method__in=[Method.MAML, Method.MAMLPP],
        status=JobStatus.SUCCEEDED,
        dataset=run.supernet.dataset,
        ways=run.supernet.ways,
        shots=run.supernet.shots,
    ).order_by("method", "-created_at")
    latest: dict[str, str] = {}
    for baseline in baselines:
        latest.setdefault(baseline.method, str(checkpoint_path(baseline)))
    return tuple(path for path in latest.values() if Path(path).exists())


def _adapt_point(event) -> dict | None:
    if event.get("kind") != "adapt":
        return None
    keys = ("current", "total", "budget_index", "budget", "metric", "generation", "population", "front",
            "best_fitness", "evaluations", "cache_hits")  # fmt: skip
    return {k: event.get(k) for k in keys if k in event}


def adaption_execute(*, run_id: int) -> AdaptionRun:
    from engine.adaption import run_adaption

    run = AdaptionRun.objects.select_related("supernet", "device", "support_set").get(pk=run_id)
    lease = job_claim(run)
    if lease is None:
        return run  # finished, or a live worker executes it: this delivery is a duplicate
    with lease:
        if run.supernet.is_metanas:
            return _metanas_adaption_execute(run, lease)
        broadcast_status(run)
        out = Path(run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        progress = HistoryProgress(run, keep=_adapt_point, lease=lease)

        def search() -> None:
            state_path = out / "state.json"
            request = _adaption_request(run, state_path, progress)
            AdaptionRun.objects.filter(pk=run.pk).update(request=request.to_dict())
            result = run_adaption(request, out_dir=out / "result", progress=progress, state_path=state_path)
            progress.flush()
            lease.check()
            _store_adaption_result(run, result, extra_baselines=_metanas_references(run))

        # ValueError: bad input discovered late (budget infeasible, LUT mismatch, ...)
        return _run_to_the_end(run, lease, progress, search, input_errors=True)


def finished_search_metric(result_metric: str | None, request_metric: str | None) -> str:
    """A finished run's search metric from its result's "search_metric" and its request's.
    Results before the engine wrote the former (and MetaNAS's) searched on the loss, unless their
    request named a metric."""
    return result_metric or request_metric or "loss"


def search_metric_of(run: AdaptionRun) -> str:
    """What the run's search minimises, hence what its front's and chart's "loss" values are:
    "loss" (mean query loss) or "accuracy" (their query error rate).

    The run's own record first - its result, else its latest streamed generation - because a
    preset's default can change between versions (`cpu` searched on the loss until 2026-12-07);
    then, for a run that has not started, what its request or preset will search on."""
    from engine.adaption_presets import ADAPTION_PRESETS  # no PyTorch in the web process

    result = run.result or {}
    if result:
        return finished_search_metric(
            result.get("search_metric"), (result.get("request") or {}).get("search_metric")
        )
    for point in reversed(run.history or []):
        if point.get("metric"):
            return point["metric"]
    if (run.request or {}).get("search_metric"):
        return run.request["search_metric"]
    if run.search_metric:
        return run.search_metric
    preset = ADAPTION_PRESETS.get(run.preset)
    return preset.search_metric if preset is not None and run.supernet.is_supernet else "loss"


def _adaption_request(run: AdaptionRun, state_path: Path, progress: HistoryProgress):
    """The engine request of this attempt: a new one, or on resume the one the saved state is of.

    Resuming keeps the request fixed on the first attempt (its LUT file, its baseline checkpoints):
    rebuilding it could differ - a baseline run finished meanwhile, the device was re-profiled - and
    the saved state would rightly refuse it. Only how to run it comes from this worker."""
    from engine.adaption import AdaptionRequest

    if run.request and state_path.exists():
        stored = AdaptionRequest.from_dict(run.request)
        return replace(
            stored,
            threads=settings.NASWEB_TORCH_THREADS,
            search_workers=_search_workers(stored.device),
            fitness_memo=_fitness_memo(run.supernet),
        )
    lut_path = _ensure_table(run, progress)
    return AdaptionRequest(
        supernet=str(checkpoint_path(run.supernet)),
        constraint=run.constraint,
        budgets=tuple(run.budgets),
        lut=str(lut_path) if lut_path else None,
        preset=run.preset,
        patience=run.patience,
        search_metric=run.search_metric or None,  # None: the preset's
        deepen=run.deepen or None,
        search_precision=run.search_precision or None,
        depth_elites=run.depth_elites or None,  # None: the preset's
        task_source="support" if run.support_set else "validation",
        support=run.support_set.path if run.support_set else None,
        measure_latency=run.device.kind == DeviceKind.LOCAL_CPU,
        baseline_checkpoints=_baseline_checkpoints(run),
        threads=settings.NASWEB_TORCH_THREADS,
        search_workers=_search_workers(settings.NASWEB_ADAPT_DEVICE),
        device=settings.NASWEB_ADAPT_DEVICE,
        fitness_memo=_fitness_memo(run.supernet),
    )


def _fitness_memo(supernet: MetaTrainingRun) -> str | None:
    """The super-net's memo of few-shot losses (beside its checkpoint; deleted with the run's files)."""
    if not settings.NASWEB_FITNESS_MEMO:
        return None
    from engine.search.memo import FITNESS_MEMO_NAME

    return str(checkpoint_path(supernet).parent / FITNESS_MEMO_NAME)


def _search_workers(device: str) -> int:
    """On a GPU the candidates are scored in the worker's own process."""
    return 1 if device == "cuda" else settings.NASWEB_SEARCH_WORKERS


def _metanas_references(run: AdaptionRun) -> list[dict[str, Any]]:
    """The latest finished MetaNAS run of the same task the user can see, as a reference point.

    Its figures come from the run's own test evaluation (each test task adapted, pruned, counted and
    timed end to end on this server's CPU), so the latency is only shown for the local-CPU device."""
    if not run.owner or not run.supernet.is_supernet:
        return []
    candidates = MetaTrainingRun.objects.visible_to(run.owner).filter(
        method=Method.METANAS,
        status=JobStatus.SUCCEEDED,
        dataset=run.supernet.dataset,
        ways=run.supernet.ways,
        shots=run.supernet.shots,
    )
    for metanas in candidates.order_by("-created_at"):
        reference = (metanas.summary or {}).get("reference")
        if not reference:
            continue
        same_machine = run.device.kind == DeviceKind.LOCAL_CPU
        keys = (
            "accuracy",
            "one_shot_accuracy",
            "loss",
            "params",
            "params_range",
            "macs",
            "accuracy_protocol",
        )
        return [
            {
                **{key: reference.get(key) for key in keys},
                "name": "MetaNAS",
                "source": f"MetaNAS run #{metanas.pk}",
                "run": metanas.pk,
                "latency_ms_lut": None,
                "measured_latency_ms": reference.get("measured_latency_ms") if same_machine else None,
                "latency_note": reference.get("latency_note")
                if same_machine
                else f"measured on this server's CPU, not on {run.device.name}: not comparable, not shown",
            }
        ]
    return []


def _metanas_measurement(device: Device) -> tuple[str, str]:
    """Where a MetaNAS task network is timed end to end for ``device``, and what the card says about it."""
    if device.kind == DeviceKind.LOCAL_CPU:
        return "cpu", f"measured end to end on {device.name} (this server's CPU)"
    if device.kind == DeviceKind.LOCAL_GPU:
        import torch

        if torch.cuda.is_available():
            return "cuda", f"measured end to end on {device.name} (this server's GPU)"
        return "cpu", f"no GPU is visible to the worker: measured on this server's CPU, not on {device.name}"
    if device.kind == DeviceKind.SIMULATED:
        return "cpu", (
            f"{device.name} is a layer-wise simulation of a search space's layers; a DARTS network is not one, "
            "so it was measured on this server's CPU instead"
        )
    return "cpu", (
        f"measured on this server's CPU, not on {device.name}: the agent times whole networks only as part "
        "of a profiling job (layer table + validation networks); there is no model-only agent job yet"
    )


def _metanas_adapt_point(event) -> dict | None:
    if event.get("kind") not in ("metanas_adapt", "metanas_eval"):
        return None
    return {k: event.get(k) for k in ("kind", "stage", "current", "total", "message") if k in event}


def _metanas_adaption_execute(run: AdaptionRun, lease) -> AdaptionRun:
    """A MetaNAS adaption: adapt weights and architecture to the task, prune, export, measure end to end.
    Runs under the caller's lease on the job."""
    from engine.metanas.service import EVAL_TASKS, MetaNasAdaptionRequest, adapt_metanas

    broadcast_status(run)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = HistoryProgress(run, keep=_metanas_adapt_point, lease=lease)
    measure_device, measure_note = _metanas_measurement(run.device)

    def adapt() -> None:
        request = MetaNasAdaptionRequest(
            run_dir=run.supernet.out_dir,
            constraint=run.constraint,
            budgets=tuple(run.budgets),
            support=run.support_set.path if run.support_set else None,
            eval_tasks=EVAL_TASKS[run.preset],
            measure_device=measure_device,
            measure_note=measure_note,
            threads=settings.NASWEB_TORCH_THREADS,
        )
        AdaptionRun.objects.filter(pk=run.pk).update(request=request.to_dict())
        result = adapt_metanas(request, out / "result", progress=progress)
        progress.flush()
        lease.check()
        _store_metanas_result(run, result)

    # ValueError (MetaNasRunError): a support set that does not fit, a damaged run folder
    return _run_to_the_end(run, lease, progress, adapt, input_errors=True)


def _store_metanas_result(run: AdaptionRun, result: dict[str, Any]) -> None:
    """One task model (MetaNAS searches no budgets): stored as the run's only outcome and model."""
    card = result["model_card"]
    checks = card["budgets"]
    evaluation = result.get("evaluation") or {}
    reference = evaluation.get("reference")
    outcome = {
        "budget": checks[0] if checks else None,
        "arch_code": card["arch_code"],
        "arch": card["genotype"],
        "costs": result["costs"],
        "constraint_met": bool(checks) and all(check["met"] for check in checks),
        "budget_checks": checks,
        "search_loss": reference["loss"] if reference else result["loss"],
        "test_accuracy": card["accuracy"],
        "random": None,
        "package": result["package"],
    }
    data = {**result, "outcomes": [outcome], "front": [], "baselines": []}
    folder = Path(result["package"])
    with transaction.atomic():
        AdaptionRun.objects.filter(pk=run.pk).update(result=data)
        AdaptedModel.objects.filter(run=run).delete()  # idempotent on redelivery
        AdaptedModel.objects.create(
            run=run,
            budget=min(run.budgets),
            arch=card["genotype"],
            card=card,
            torchscript=str(folder / card["files"]["torchscript"]),
            card_path=str(folder / card["files"]["card"]),
        )


def _store_adaption_result(run: AdaptionRun, result, *, extra_baselines: list[dict] = ()) -> None:
    data = result.to_dict()
    data["baselines"] = list(data["baselines"]) + list(extra_baselines)
    with transaction.atomic():
        AdaptionRun.objects.filter(pk=run.pk).update(result=data)
        AdaptedModel.objects.filter(run=run).delete()  # idempotent on redelivery
        for outcome in data["outcomes"]:
            folder = Path(outcome["package"])
            card = outcome["model_card"]
            files = card.get("files", {})
            AdaptedModel.objects.create(
                run=run,
                budget=float(outcome["budget"]["limit"]),
                arch=outcome["arch"],
                card=card,
                torchscript=str(folder / files.get("torchscript", "model.pt")),
                onnx=str(folder / files["onnx"]) if "onnx" in files else "",
                card_path=str(folder / "model_card.json"),
            )


def adaption_delete_files(run: AdaptionRun) -> None:
    shutil.rmtree(run.out_dir, ignore_errors=True)


def reference_points(run: AdaptionRun) -> list[dict[str, Any]]:
    """MAML / MAML++ points for the Pareto chart: the baselines of the result, plus any finished
    baseline meta-training runs of the same task the user can see."""
    points = []
    for baseline in (run.result or {}).get("baselines", []):
        points.append(baseline)
    return points
