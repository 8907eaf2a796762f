"""The board agent against a live server on loopback, unthrottled and as a slow board (issue 5).

Starts its own stack in a temporary folder (SQLite database, artifacts, daphne on 127.0.0.1;
Redis at REDIS_URL, or an embedded redis-server when none answers), registers two boards through
the real service and gives each a profiling job of the chosen preset, downloads the agent from
the server (``/agent/nasweb_agent.py``) and runs it as a subprocess with ``--once``:

a. baseline: unthrottled, 1 torch thread;
b. slow board: pinned to one core and limited to ``--limit`` % of it (Debian's ``cpulimit``
   when installed, else a SIGSTOP/SIGCONT duty cycle of this script with a 100 ms period),
   1 torch thread.

Reported per run: total profiling time (the agent's wall time from start to "job complete"),
layers measured, whole-model measurements, time per layer, the CPU share the agent actually got,
and whether the LUT was built with one entry per job layer; then the slowdown (b)/(a). The
whole-model files are exported by the server before the agent starts, so the times are the
board's work (and the HTTP round trips), not the server's TorchScript export.

Every process it starts runs in its own session and is stopped on exit, Ctrl-C or SIGTERM.
The last stdout line is one JSON object.

    python benchmarks/agent_slow_board.py [--quick] [--preset paper] [--limit 25] [--core 0]
                                          [--throttler auto|cpulimit|duty] [--no-speed-reference]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._children import ChildProcesses, redis_or_embedded  # noqa: E402

DUTY_PERIOD_S = 0.1
#: The quick run's profiling settings: the "tiny" preset's, on a 36-layer space (every preset's
#: own VGG9 space has 2,800 distinct layers, minutes of work for a slow board).
QUICK_SETTINGS = {"repeats": 5, "warmup": 1, "accuracy_subnets": 3, "overhead_subnets": 3}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def quick_space():
    """VGG9 Omniglot 5-way with few choices (36 layer keys), as tests/conftest.py tiny_space."""
    from engine.space import SearchSpace

    return dataclasses.replace(
        SearchSpace.vgg9(image_size=28, num_classes=5),
        kernels=(1, 3),
        widths=(0.25, 0.5),
        activations=("relu",),
    )


class DutyCycleThrottler:
    """Lets a process group run ``share`` of every 100 ms period (SIGCONT ... SIGSTOP)."""

    def __init__(self, pgid: int, share: float) -> None:
        self.pgid = pgid
        self.share = share
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        running_s = DUTY_PERIOD_S * self.share
        try:
            while not self._stop.is_set():
                os.killpg(self.pgid, signal.SIGCONT)
                if self._stop.wait(running_s):
                    break
                os.killpg(self.pgid, signal.SIGSTOP)
                self._stop.wait(DUTY_PERIOD_S - running_s)
        except ProcessLookupError:
            return
        finally:
            try:
                os.killpg(self.pgid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def choose_throttler(requested: str) -> str:
    found = shutil.which("cpulimit")
    if requested == "cpulimit" and not found:
        raise SystemExit("--throttler cpulimit: no cpulimit on PATH (apt-get install cpulimit)")
    if requested == "auto":
        return "cpulimit" if found else "duty"
    return requested


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited early:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def agent_run(
    name: str,
    *,
    agent: Path,
    server: str,
    owner,
    space,
    settings: dict,
    children: ChildProcesses,
    folder: Path,
    throttle: dict | None,
) -> dict:
    """Register a board, give it a job, run the agent on it once; the run's figures."""
    from devices import services
    from devices.models import LatencyTableRecord, LayerTiming, ModelMeasurement
    from nasweb.core.models import JobStatus

    registration = services.board_register(owner=owner, name=f"bench-{name}")
    job = services.profiling_start(device=registration.device, owner=owner, space=space, **settings)
    started = time.perf_counter()
    # Normally done on the agent's first fetch; here beforehand, so the run times the board's work only.
    services._ensure_accuracy_models(job)
    export_s = time.perf_counter() - started

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(agent), "--server", server, "--token", registration.token, "--once",
               "--threads", "1", "--backoff", "0.2"]  # fmt: skip
    popen = {}
    if throttle is not None:
        core = throttle["core"]
        popen["preexec_fn"] = lambda: os.sched_setaffinity(0, {core})
    log_path = children.log_path(f"agent-{name}")
    log(f"{name}: agent on {job.total_layers} layers + {job.overhead_subnets + job.accuracy_subnets} models")
    started = time.perf_counter()
    process = children.start(f"agent-{name}", command, env=env, **popen)
    duty = None
    if throttle is not None and throttle["tool"] == "cpulimit":
        limiter = ["cpulimit", "-p", str(process.pid), "-l", str(throttle["limit"]), "-z", "-q"]
        children.start(f"cpulimit-{name}", limiter)
    elif throttle is not None:
        duty = DutyCycleThrottler(process.pid, throttle["limit"] / 100)
        duty.start()
    try:
        _, wait_status, usage = os.wait4(process.pid, 0)
    finally:
        if duty is not None:
            duty.stop()
    total_s = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    agent_log = log_path.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"agent {name} exited with {process.returncode}:\n{agent_log[-3000:]}")

    job.refresh_from_db()
    layers = LayerTiming.objects.filter(job=job).count()
    models = ModelMeasurement.objects.filter(job=job, measured_ms__isnull=False).count()
    record = LatencyTableRecord.objects.filter(device=registration.device).order_by("-pk").first()
    cpu_s = usage.ru_utime + usage.ru_stime
    figures = {
        "total_s": round(total_s, 2),
        "layers_measured": layers,
        "job_layers": job.total_layers,
        "models_measured": models,
        "s_per_layer": round(total_s / layers, 5),
        "cpu_s": round(cpu_s, 2),
        "cpu_share": round(cpu_s / total_s, 3),
        "lut_built": bool(
            job.status == JobStatus.SUCCEEDED and record and record.entries_count == job.total_layers
        ),
        "lut_entries": record.entries_count if record else 0,
        "lut_mape": round(record.accuracy["mape"], 2) if record and record.accuracy else None,
        "server_model_export_s": round(export_s, 2),
    }
    log(f"{name}: {json.dumps(figures)}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="36-layer space, tiny settings (< 1 minute)")
    parser.add_argument(
        "--preset", default="paper", help="profiling preset of a full run (devices PROFILING_PRESETS)"
    )
    parser.add_argument("--limit", type=int, default=25, help="CPU percent of one core the slow board gets")
    parser.add_argument("--core", type=int, default=0, help="the core the slow board is pinned to")
    parser.add_argument("--throttler", choices=("auto", "cpulimit", "duty"), default="auto")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    parser.add_argument(
        "--no-speed-reference",
        action="store_true",
        help="jobs made with speed_reference=False: the agent times raw medians, no reference call",
    )
    args = parser.parse_args()
    if not 1 <= args.limit <= 100:
        parser.error("--limit must be within 1..100")
    throttler = choose_throttler(args.throttler)

    def on_signal(signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    folder = Path(tempfile.mkdtemp(prefix="nasweb-agent-bench-"))
    children = ChildProcesses(folder, log=log)
    try:
        return run(args, throttler, folder, children)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop()
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, throttler: str, folder: Path, children: ChildProcesses) -> int:
    from nasweb.launcher import free_port

    redis_url = redis_or_embedded(args.redis_url, children)
    for name in ("artifacts", "media", "cache"):
        (folder / name).mkdir()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "nasweb.settings",
            "DATABASE_URL": f"sqlite:///{folder / 'db.sqlite3'}",
            "REDIS_URL": redis_url,
            "NASWEB_ARTIFACT_DIR": str(folder / "artifacts"),
            "NASWEB_MEDIA_DIR": str(folder / "media"),
            "NASWEB_CACHE_DIR": str(folder / "cache"),
            "NASWEB_SECRET_KEY": "nasweb-benchmark-secret-key-for-a-throwaway-database-0123",
            "NASWEB_DEBUG": "0",
            "NASWEB_TORCH_THREADS": "1",
            # The web server dies with this script even if it is killed with SIGKILL.
            "NASWEB_EXIT_WITH_PARENT": str(os.getpid()),
        }
    )
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from devices.services import PROFILING_PRESETS

    call_command("migrate", verbosity=0, interactive=False)
    owner = get_user_model().objects.create_user("bench-owner", password="bench-owner-password-1")
    if args.quick:
        space, settings, label = quick_space(), QUICK_SETTINGS, "quick (36-layer VGG9, tiny settings)"
    else:
        from engine.presets import search_space

        space, settings, label = search_space(args.preset), PROFILING_PRESETS[args.preset], args.preset
    settings = {**settings, "speed_reference": not args.no_speed_reference}

    port = free_port()
    server = f"http://127.0.0.1:{port}"
    web = children.start(
        "daphne",
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "nasweb.asgi:application"],
    )
    wait_for_http(f"{server}/agent/nasweb_agent.py", web, children.log_path("daphne"))
    agent = folder / "nasweb_agent.py"
    with urllib.request.urlopen(f"{server}/agent/nasweb_agent.py", timeout=30) as response:
        agent.write_bytes(response.read())
    log(
        f"server {server}, Redis {redis_url}, agent downloaded ({agent.stat().st_size} bytes); preset {label}"
    )

    common = {"agent": agent, "server": server, "owner": owner, "space": space, "settings": settings,
              "children": children, "folder": folder}  # fmt: skip
    baseline = agent_run("baseline", throttle=None, **common)
    throttle = {"tool": throttler, "limit": args.limit, "core": args.core}
    slow = agent_run("slow-board", throttle=throttle, **common)

    throttle_label = (
        f"cpulimit -l {args.limit}"
        if throttler == "cpulimit"
        else f"SIGSTOP/SIGCONT duty cycle {args.limit} % of 100 ms"
    )
    figures = {
        "preset": label,
        "settings": settings,
        "throttle": f"pinned to core {args.core}, {throttle_label}, 1 torch thread",
        "baseline": baseline,
        "slow_board": slow,
        "slowdown": round(slow["total_s"] / baseline["total_s"], 2),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(
        f"total profiling time: baseline {baseline['total_s']:.1f} s, slow board {slow['total_s']:.1f} s "
        f"({figures['slowdown']:.2f}x; CPU share {baseline['cpu_share']:.2f} vs {slow['cpu_share']:.2f})"
    )
    print(json.dumps(figures))
    ok = baseline["lut_built"] and slow["lut_built"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
