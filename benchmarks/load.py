"""Load: adaption requests queued at once, concurrent dashboard/API clients, websocket lag.

Starts its own stack on loopback - a throwaway SQLite database in a temporary folder, Redis
(``--redis-url``, default DB 14 of the local server, else an embedded redis-server), a real
Celery worker and daphne - then measures:

(a) ``--adaptions`` adaption requests (tiny preset, a parameter budget, so no profiling)
    POSTed to ``/api/runs/adapt/`` at once, against a tiny super-net meta-trained first
    through ``/api/runs/train/``: all succeed, none runs twice (``attempts`` on each row),
    total and per-job seconds;
(b) ``--clients`` concurrent HTTP clients (half on dashboard pages with a session cookie, half
    on JSON endpoints: the REST API with a token and the pages' ``.json`` views with the
    session) for ``--duration`` seconds, with ``wrk`` (Debian: ``apt-get install wrk``);
    p50/p95/p99 per class and the error count. Each client pauses ``--think-ms`` on average
    between requests, like a person or a polling page; the same clients firing back-to-back
    are measured too, as the server's capacity. A static file under the same load is the
    floor (what daphne + Django middleware cost with no view, no query, no template);
    ``/healthz`` is not, because it waits for a Celery ping on purpose. Unloaded latency and
    SQL queries of every endpoint are printed to explain the tails;
(c) websocket lag: clients subscribed to ``ws/jobs/<kind>/<id>/`` of real jobs (the
    meta-training, every queued adaption, and one adaption run while (b)'s load runs again);
    lag = receive time - ``sent_at`` that the worker stamps on each progress event
    (same machine, same clock).

Run: ``python benchmarks/load.py [--quick]`` (quick: about a minute, full: about 15 on two
cores). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks._children import ChildProcesses, redis_or_embedded  # noqa: E402
from nasweb.launcher import free_port  # noqa: E402
from nasweb.serve import default_processes  # noqa: E402

FINISHED = {"succeeded", "failed", "cancelled"}


def log(message: str) -> None:
    print(f"[load] {message}", flush=True)


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "count": len(ordered),
        "p50": at(0.50),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
    }


def ratio(baseline: float | None, candidate: float | None) -> float | None:
    return round(baseline / candidate, 2) if baseline and candidate else None


# --------------------------------------------------------------------------- the stack
def configure_environment(folder: Path, redis_url: str, worker_concurrency: int) -> dict[str, str]:
    """Environment of this process (Django set up in-process on the same DB) and of the children."""
    for name in ("artifacts", "media"):
        (folder / name).mkdir()
    env = {
        "DJANGO_SETTINGS_MODULE": "nasweb.settings",
        "DATABASE_URL": f"sqlite:///{folder / 'load.sqlite3'}",
        "REDIS_URL": redis_url,
        "NASWEB_SECRET_KEY": secrets.token_urlsafe(50),
        "NASWEB_ARTIFACT_DIR": str(folder / "artifacts"),
        "NASWEB_MEDIA_DIR": str(folder / "media"),
        "NASWEB_WORKER_CONCURRENCY": str(worker_concurrency),
        "NASWEB_TORCH_THREADS": "1",
        "NASWEB_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        # Children exit if this benchmark is killed, so no worker outlives it and steals tasks.
        "NASWEB_EXIT_WITH_PARENT": str(os.getpid()),
    }
    os.environ.update(env)
    return dict(os.environ)


def setup_django_and_accounts() -> dict:
    """Migrate, seed the built-in devices (the bootstrap command), create a user, token and session."""
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client
    from rest_framework.authtoken.models import Token

    call_command("migrate", "--noinput", verbosity=0)
    os.environ.setdefault("NASWEB_ADMIN_PASSWORD", secrets.token_urlsafe(16))
    call_command("bootstrap", stdout=open(os.devnull, "w"))  # noqa: SIM115
    user = get_user_model().objects.create_user("loadtest", password=secrets.token_urlsafe(16))
    token = Token.objects.create(user=user).key
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    from django.db import connection

    connection.close()  # the SQLite file is shared with the worker and daphne
    return {"user": user, "token": token, "cookie": f"{settings.SESSION_COOKIE_NAME}={session}"}


# --------------------------------------------------------------------------- HTTP helpers
class Http:
    def __init__(self, base: str, token: str, cookie: str) -> None:
        self.base, self.token, self.cookie = base, token, cookie

    def request(self, path: str, *, body: dict | None = None, auth: str = "token", timeout: float = 60):
        headers = {"Accept": "application/json"}
        if auth == "token":
            headers["Authorization"] = f"Token {self.token}"
        elif auth == "session":
            headers["Cookie"] = self.cookie
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def wait_until_up(self, stack: ChildProcesses, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stack.check_alive()
            try:
                urllib.request.urlopen(self.base + "/accounts/login/", timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise SystemExit(f"daphne did not answer within {timeout:.0f}s:\n{stack.log_tail('web')}")


def wait_for_worker(stack: ChildProcesses, timeout: float = 120) -> None:
    from nasweb.celery import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        if app.control.ping(timeout=0.5):
            return
    raise SystemExit(f"no Celery worker answered within {timeout:.0f}s:\n{stack.log_tail('worker')}")


# --------------------------------------------------------------------------- websocket lag
class LagRecorder:
    """Websocket subscribers on one asyncio loop in a thread; each progress message's lag."""

    def __init__(self, ws_base: str, cookie: str, origin: str) -> None:
        self.ws_base, self.cookie, self.origin = ws_base, cookie, origin
        self.lags: list[tuple[float, float]] = []  # (receive wall time, lag ms)
        self.messages = 0
        self.connect_failures: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tasks: list = []

    def subscribe(self, kind: str, job_id: int, timeout_s: float) -> None:
        self.tasks.append(asyncio.run_coroutine_threadsafe(self._listen(kind, job_id, timeout_s), self.loop))

    async def _listen(self, kind: str, job_id: int, timeout_s: float) -> None:
        import websockets

        url = f"{self.ws_base}/ws/jobs/{kind}/{job_id}/"
        try:
            async with websockets.connect(
                url, additional_headers={"Cookie": self.cookie}, origin=self.origin, open_timeout=30
            ) as socket:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    try:
                        raw = await asyncio.wait_for(
                            socket.recv(), timeout=max(0.1, deadline - time.monotonic())
                        )
                    except TimeoutError:
                        return
                    received = time.time()
                    message = json.loads(raw)
                    self.messages += 1
                    sent_at = message.get("sent_at")
                    if message.get("type") == "progress" and isinstance(sent_at, int | float):
                        self.lags.append((received, (received - sent_at) * 1000))
                    if message.get("type") == "status" and message.get("status") in FINISHED:
                        return
        except Exception as exc:  # noqa: BLE001 - a failed subscription is a reported figure
            self.connect_failures.append(f"{kind}/{job_id}: {type(exc).__name__}: {exc}")

    def wait(self, timeout: float) -> None:
        for task in self.tasks:
            try:
                task.result(timeout=timeout)
            except Exception:  # noqa: BLE001, S110 - reported through connect_failures / counts
                pass
        self.tasks = []

    def between(self, start: float, end: float) -> list[float]:
        return [lag for received, lag in self.lags if start <= received <= end]


# --------------------------------------------------------------------------- jobs
def wait_for_jobs(
    http: Http, path: str, ids: set[int], stack: ChildProcesses, timeout: float
) -> dict[int, dict]:
    """Poll a list endpoint until every job in ``ids`` is finished; returns their rows."""
    deadline = time.monotonic() + timeout
    rows: dict[int, dict] = {}
    last_report = 0.0
    while time.monotonic() < deadline:
        stack.check_alive()
        status, listing = http.request(f"{path}?limit=500")  # every job of this run, not one page
        if status == 200:
            rows = {row["id"]: row for row in listing if row["id"] in ids}
            finished = sum(1 for row in rows.values() if row["status"] in FINISHED)
            if finished == len(ids):
                return rows
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                log(f"{finished}/{len(ids)} finished")
        time.sleep(1.0)
    raise SystemExit(f"jobs did not finish within {timeout:.0f}s; worker log:\n{stack.log_tail('worker')}")


def meta_train_supernet(
    http: Http, stack: ChildProcesses, lag: LagRecorder, timeout: float
) -> tuple[int, float]:
    started = time.monotonic()
    status, run = http.request(
        "/api/runs/train/", body={"method": "hmetanas", "preset": "tiny", "ways": 5, "shots": 1}
    )
    if status != 201:
        raise SystemExit(f"starting meta-training failed: {status} {run}")
    lag.subscribe("metatrain", run["id"], timeout)
    rows = wait_for_jobs(http, "/api/runs/train/", {run["id"]}, stack, timeout)
    if rows[run["id"]]["status"] != "succeeded":
        raise SystemExit(f"meta-training failed: {rows[run['id']]['error']}\n{stack.log_tail('worker')}")
    return run["id"], time.monotonic() - started


def parse_time(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def queue_adaptions(
    http: Http, supernet: int, device: int, count: int, budget: float
) -> tuple[list[int], list[float]]:
    body = {
        "supernet": supernet,
        "device": device,
        "constraint": "params",
        "budgets": [budget],
        "preset": "tiny",
    }

    def post(index: int) -> tuple[int, float, object]:
        started = time.perf_counter()
        status, run = http.request("/api/runs/adapt/", body={**body, "name": f"load-{index}"})
        return status, (time.perf_counter() - started) * 1000, run

    with ThreadPoolExecutor(max_workers=min(count, 25)) as pool:
        answers = list(pool.map(post, range(count)))
    failed = [(status, run) for status, _, run in answers if status != 201]
    if failed:
        raise SystemExit(f"{len(failed)} adaption requests were refused, e.g. {failed[0]}")
    return [run["id"] for _, _, run in answers], [ms for _, ms, _ in answers]


def adaption_figures(http, stack, lag, supernet, device, count, budget, timeout) -> dict:
    from nasweb.runs.models import AdaptedModel, AdaptionRun

    window_start = time.time()
    started = time.monotonic()
    ids, post_ms = queue_adaptions(http, supernet, device, count, budget)
    queued_s = time.monotonic() - started
    log(f"{count} adaption requests queued in {queued_s:.2f} s; waiting for the worker")
    for run_id in ids:
        lag.subscribe("adaption", run_id, timeout)
    rows = wait_for_jobs(http, "/api/runs/adapt/", set(ids), stack, timeout)
    total_s = time.monotonic() - started
    lag.wait(timeout=30)
    per_job = [
        parse_time(r["finished_at"]) - parse_time(r["started_at"]) for r in rows.values() if r["started_at"]
    ]
    statuses = [row["status"] for row in rows.values()]
    attempts = dict(AdaptionRun.objects.filter(pk__in=ids).values_list("pk", "attempts"))
    models = AdaptedModel.objects.filter(run_id__in=ids).count()
    from django.db import connection

    connection.close()
    lags = lag.between(window_start, time.time())
    return {
        "requests": count,
        "distinct_runs": len(set(ids)),
        "succeeded": statuses.count("succeeded"),
        "all_succeeded": statuses.count("succeeded") == count,
        "errors": [row["error"] for row in rows.values() if row["status"] != "succeeded"][:3],
        "duplicates": sum(1 for n in attempts.values() if n > 1),
        "models": models,
        "queue_s": round(queued_s, 2),
        "post_ms": percentiles(post_ms),
        "total_s": round(total_s, 1),
        "jobs_per_min": round(count / total_s * 60, 2),
        "per_job_s": {
            "mean": round(statistics.mean(per_job), 2),
            "median": round(statistics.median(per_job), 2),
            "max": round(max(per_job), 2),
        },
        "ws_lag_ms": percentiles(lags),
    }


# --------------------------------------------------------------------------- HTTP load (wrk)
WRK_SCRIPT = r"""
local targets = %(targets)s
local threads = {}
local requests = {}
local index = 0
non200 = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(%(seed)d + #threads)
  for i, target in ipairs(targets) do
    requests[i] = wrk.format("GET", target[1], target[2])
  end
end

function request()
  index = index %% #requests + 1
  return requests[index]
end

%(delay)s
function response(status, headers, body)
  if status ~= 200 then non200 = non200 + 1 end
end

function done(summary, latency, _)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("non200") end
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "duration_s": %%.3f, "p50_ms": %%.2f, "p95_ms": %%.2f, "p99_ms": %%.2f, ' ..
    '"max_ms": %%.2f, "mean_ms": %%.2f, "non200": %%d, "socket_errors": %%d, "timeouts": %%d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, latency.mean / 1e3, bad,
    e.connect + e.read + e.write, e.timeout))
end
"""


def lua_targets(targets: list[tuple[str, dict[str, str]]]) -> str:
    def lua_string(text: str) -> str:
        return json.dumps(text)  # JSON string escapes are valid Lua for ASCII

    items = []
    for path, headers in targets:
        header_items = ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())
        items.append(f"{{{lua_string(path)}, {{{header_items}}}}}")
    return "{" + ", ".join(items) + "}"


# A client's think time between two requests, uniform in [mean/2, 3*mean/2] ms (wrk calls delay()).
THINK_DELAY = """
function delay()
  return math.random(%(low)d, %(high)d)
end
"""


def start_wrk(
    base: str, targets, clients: int, duration_s: float, think_ms: int, folder: Path, name: str
) -> subprocess.Popen:
    script = folder / f"{name}.lua"
    delay = THINK_DELAY % {"low": think_ms // 2, "high": think_ms * 3 // 2} if think_ms > 0 else ""
    seed = secrets.randbelow(10**6)
    script.write_text(WRK_SCRIPT % {"targets": lua_targets(targets), "delay": delay, "seed": seed})
    command = [
        "wrk",
        "-t1",
        f"-c{clients}",
        f"-d{int(duration_s)}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_result(process: subprocess.Popen) -> dict:
    output, _ = process.communicate()
    for line in output.splitlines():
        if line.startswith("WRK "):
            result = json.loads(line[4:])
            result["errors"] = result["non200"] + result["socket_errors"] + result["timeouts"]
            result["rps"] = round(result["requests"] / result["duration_s"], 1)
            return result
    raise SystemExit(f"wrk printed no result:\n{output}")


def run_wrk(
    base: str, groups: dict[str, list], clients: int, duration_s: float, think_ms: int, folder: Path
) -> dict:
    """Run one wrk per group at the same time, ``clients`` split evenly; results per group.

    With ``think_ms`` each connection is a client that waits that long on average between two
    requests; with 0 every connection fires back-to-back (a closed loop: the server's capacity,
    where latency is simply connections / throughput)."""
    share = max(1, clients // len(groups))
    processes = {
        name: start_wrk(base, targets, share, duration_s, think_ms, folder, name)
        for name, targets in groups.items()
    }
    return {name: wrk_result(process) for name, process in processes.items()}


def load_targets(http: Http, supernet: int, adaption: int, device: int, token: str, cookie: str) -> dict:
    session = {"Cookie": cookie}
    api = {"Authorization": f"Token {token}"}
    pages = [
        ("/", session),
        ("/devices/", session),
        (f"/devices/{device}/", session),
        ("/runs/train/", session),
        (f"/runs/train/{supernet}/", session),
        ("/runs/adapt/", session),
        (f"/runs/adapt/{adaption}/", session),
        (f"/runs/compare/?supernet={supernet}", session),
    ]
    json_targets = [
        ("/api/runs/adapt/", api),
        (f"/api/runs/adapt/{adaption}/", api),
        ("/api/runs/train/", api),
        ("/api/devices/", api),
        ("/api/models/", api),
        (f"/runs/adapt/{adaption}.json", session),
        (f"/runs/train/{supernet}.json", session),
        (f"/runs/compare/{supernet}.json", session),
    ]
    return {"pages": pages, "json": json_targets}


def endpoint_profile(base: str, groups: dict[str, list], repeats: int) -> dict[str, dict]:
    """Unloaded latency (median of sequential requests) and SQL queries per view, to explain the tails."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="127.0.0.1")
    profile = {}
    for targets in groups.values():
        for path, headers in targets:
            timings = []
            for _ in range(repeats):
                request = urllib.request.Request(base + path, headers=headers)
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=30) as response:
                    body = response.read()
                timings.append((time.perf_counter() - started) * 1000)
            extra = {}
            if "Authorization" in headers:
                extra["HTTP_AUTHORIZATION"] = headers["Authorization"]
            else:
                client.cookies.load(headers["Cookie"])
            with CaptureQueriesContext(connection) as queries:
                client.get(path, **extra)
            profile[path] = {
                "ms": round(statistics.median(timings), 1),
                "queries": len(queries),
                "kb": len(body) // 1024,
            }
    connection.close()
    return profile


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 adaptions, 10 clients, 3 s windows (about a minute)"
    )
    parser.add_argument("--adaptions", type=int, default=None, help="requests queued at once (100; quick 2)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (50; quick 10)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of HTTP load (30; quick 3)")
    parser.add_argument(
        "--think-ms", type=int, default=1000, help="mean pause of a client between requests (0: back-to-back)"
    )
    parser.add_argument("--worker-concurrency", type=int, default=2, help="Celery worker processes")
    parser.add_argument(
        "--web-processes",
        type=int,
        default=None,
        help="daphne processes behind the port (python -m nasweb.serve; default one per core); "
        "one single-process daphne is measured beside it as the baseline",
    )
    parser.add_argument("--budget", type=float, default=8000, help="parameter budget of each adaption")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/14", help="flushed first: use a spare DB"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the jobs of a phase")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    args = parser.parse_args()
    adaptions = args.adaptions or (2 if args.quick else 100)
    clients = args.clients or (10 if args.quick else 50)
    duration = args.duration or (3.0 if args.quick else 30.0)
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks/load.py needs wrk, the HTTP load tool: apt-get install wrk")

    folder = Path(tempfile.mkdtemp(prefix="nasweb-load-"))
    stack = ChildProcesses(folder, log=log)
    try:
        redis_url = redis_or_embedded(args.redis_url, stack, flush=True)
        stack.env = configure_environment(folder, redis_url, args.worker_concurrency)
        accounts = setup_django_and_accounts()
        port, single_port = free_port(), free_port()
        base, single_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{single_port}"
        web_processes = args.web_processes or default_processes()
        stack.start("worker", [
            sys.executable, "-m", "celery", "-A", "nasweb", "worker", "-Q", "default,train,profile,adapt",
            "-c", str(args.worker_concurrency), "-n", f"load-{os.getpid()}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle",
        ])  # fmt: skip
        stack.start(
            "web",
            [sys.executable, "-m", "nasweb.serve", "--host", "127.0.0.1", "--port", str(port),
             "--processes", str(web_processes)],
        )  # fmt: skip
        # The baseline in the same run: one daphne process, as `make run` served before nasweb.serve.
        stack.start(
            "web-single",
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(single_port),
                "nasweb.asgi:application",
            ],
        )
        http = Http(base, accounts["token"], accounts["cookie"])
        http.wait_until_up(stack)
        Http(single_base, accounts["token"], accounts["cookie"]).wait_until_up(stack)
        wait_for_worker(stack)
        log(
            f"stack up at {base} ({web_processes} web processes; single-process baseline at {single_base}; "
            f"worker concurrency {args.worker_concurrency}); files in {folder}"
        )
        lag = LagRecorder(f"ws://127.0.0.1:{port}", accounts["cookie"], base)

        window = time.time()
        supernet, meta_s = meta_train_supernet(http, stack, lag, args.timeout)
        lag.wait(timeout=30)
        metatrain_lag = percentiles(lag.between(window, time.time()))
        log(f"super-net #{supernet} meta-trained in {meta_s:.1f} s; ws lag {metatrain_lag}")

        status, devices = http.request("/api/devices/")
        device = next(d["id"] for d in devices if d["kind"] == "local_cpu")
        adaption = adaption_figures(http, stack, lag, supernet, device, adaptions, args.budget, args.timeout)
        log(f"adaption queue: {json.dumps(adaption)}")

        groups = load_targets(
            http, supernet, min(adaption_ids(supernet)), device, accounts["token"], accounts["cookie"]
        )
        profile = endpoint_profile(base, groups, repeats=5 if args.quick else 10)
        for path, figures in profile.items():
            log(
                f"  {path:40s} {figures['ms']:7.1f} ms  {figures['queries']:3d} queries  {figures['kb']:4d} KiB"
            )
        static = {"static": [("/static/css/nasweb.css", {})]}
        think = args.think_ms
        floor = run_wrk(base, static, clients, duration, think, folder)["static"]
        log(f"floor (static file, {clients} clients, think {think} ms): {json.dumps(floor)}")
        single_load = run_wrk(single_base, groups, clients, duration, think, folder)
        log(f"baseline, one daphne process: pages + JSON, {clients} clients: {json.dumps(single_load)}")
        idle_load = run_wrk(base, groups, clients, duration, think, folder)
        log(
            f"pages + JSON, {clients} clients, think {think} ms, {web_processes} web processes, "
            f"worker idle: {json.dumps(idle_load)}"
        )
        saturated = run_wrk(base, groups, clients, duration, 0, folder)
        log(f"pages + JSON, {clients} clients back-to-back (capacity): {json.dumps(saturated)}")
        saturated_floor = run_wrk(base, static, clients, duration, 0, folder)["static"]
        log(f"static file, {clients} clients back-to-back: {json.dumps(saturated_floor)}")

        # (c) the same load while a real adaption runs on the worker, its websocket subscribed.
        ids, _ = queue_adaptions(http, supernet, device, 1, args.budget)
        lag.subscribe("adaption", ids[0], args.timeout)
        window = time.time()
        busy_load = run_wrk(base, groups, clients, duration, think, folder)
        busy_window_end = time.time()
        wait_for_jobs(http, "/api/runs/adapt/", set(ids), stack, args.timeout)
        lag.wait(timeout=30)
        lag_under_load = percentiles(lag.between(window, busy_window_end))
        log(f"pages + JSON with a job running: {json.dumps(busy_load)}; ws lag under load {lag_under_load}")
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    all_lags = percentiles([ms for _, ms in lag.lags])
    summary = {
        "benchmark": "load",
        "quick": args.quick,
        "adaptions": adaptions,
        "adapt_all_succeeded": adaption["all_succeeded"],
        "adapt_duplicates": adaption["duplicates"],
        "adapt_total_s": adaption["total_s"],
        "adapt_per_job_s_mean": adaption["per_job_s"]["mean"],
        "adapt_jobs_per_min": adaption["jobs_per_min"],
        "adapt_post_p95_ms": adaption["post_ms"]["p95"],
        "clients": clients,
        "duration_s": duration,
        "pages_p50_ms": idle_load["pages"]["p50_ms"],
        "pages_p95_ms": idle_load["pages"]["p95_ms"],
        "pages_p99_ms": idle_load["pages"]["p99_ms"],
        "json_p50_ms": idle_load["json"]["p50_ms"],
        "json_p95_ms": idle_load["json"]["p95_ms"],
        "json_p99_ms": idle_load["json"]["p99_ms"],
        "http_errors": idle_load["pages"]["errors"] + idle_load["json"]["errors"],
        "http_rps": round(idle_load["pages"]["rps"] + idle_load["json"]["rps"], 1),
        "web_processes": web_processes,
        "single_process_pages_p95_ms": single_load["pages"]["p95_ms"],
        "single_process_json_p95_ms": single_load["json"]["p95_ms"],
        "single_process_http_errors": single_load["pages"]["errors"] + single_load["json"]["errors"],
        "pages_p95_ratio_single_over_multi": ratio(
            single_load["pages"]["p95_ms"], idle_load["pages"]["p95_ms"]
        ),
        "json_p95_ratio_single_over_multi": ratio(single_load["json"]["p95_ms"], idle_load["json"]["p95_ms"]),
        "think_ms": args.think_ms,
        "floor_static_p95_ms": floor["p95_ms"],
        "saturated_rps": round(saturated["pages"]["rps"] + saturated["json"]["rps"], 1),
        "saturated_pages_p95_ms": saturated["pages"]["p95_ms"],
        "saturated_json_p95_ms": saturated["json"]["p95_ms"],
        "saturated_errors": saturated["pages"]["errors"] + saturated["json"]["errors"],
        "saturated_static_rps": saturated_floor["rps"],
        "saturated_static_p95_ms": saturated_floor["p95_ms"],
        "busy_pages_p95_ms": busy_load["pages"]["p95_ms"],
        "busy_json_p95_ms": busy_load["json"]["p95_ms"],
        "busy_http_errors": busy_load["pages"]["errors"] + busy_load["json"]["errors"],
        "ws_lag_p50_ms": all_lags["p50"],
        "ws_lag_p95_ms": all_lags["p95"],
        "ws_messages": lag.messages,
        "ws_lag_samples": all_lags["count"],
        "ws_lag_p95_ms_metatrain": metatrain_lag["p95"],
        "ws_lag_p95_ms_adapt_queue": adaption["ws_lag_ms"]["p95"],
        "ws_lag_p95_ms_under_http_load": lag_under_load["p95"],
        "ws_connect_failures": len(lag.connect_failures),
        "meta_train_s": round(meta_s, 1),
        "worker_concurrency": args.worker_concurrency,
        "endpoints": profile,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(summary))


def adaption_ids(supernet: int) -> list[int]:
    from django.db import connection

    from nasweb.runs.models import AdaptionRun

    ids = list(
        AdaptionRun.objects.filter(supernet_id=supernet, status="succeeded").values_list("pk", flat=True)
    )
    connection.close()
    return ids


if __name__ == "__main__":
    main()
