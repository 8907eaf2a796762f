#!/usr/bin/env python3
"""nasweb board agent: profiles layer latencies on this device for a nasweb server.

Self-contained on purpose: this one file is downloaded onto boards and needs only Python >= 3.9,
PyTorch and the standard library. Usage::

    python nasweb_agent.py --server https://nasweb.example.org --token TOKEN [--threads N] [--once]

It fetches its profiling job (``GET /api/agent/job``), rebuilds every layer from its spec, times it
as TorchScript (eval mode, warm-up, repeated ``perf_counter_ns`` timings, median after dropping
samples outside median ± 3·MAD), posts the results in batches, measures any whole exported models
of the job, and reports completion. Each timed call follows one call of a fixed reference
convolution, and every figure is expressed at one reference speed of the board (the job's
``reference_ms``, calibrated by the first agent run and kept by the server), so a board that
throttles or shares its cores gives entries that agree with each other. Layers the server already has (``done_keys``) are skipped, so
an agent that was stopped simply continues where it left off. Network errors are retried with
exponential backoff; a batch is re-sent with the same ``batch_id`` so the server stores it once.
The protocol is documented in docs/AGENT_PROTOCOL.md of the nasweb repository.

Exit status: 0 job complete (or, with --once, no job waiting), 1 protocol/measurement error,
2 token rejected, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings

import torch
from torch import nn

AGENT_VERSION = "1"
MAD_TO_SIGMA = 1.4826
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class AuthRejected(Exception):
    """The server refused the token (401/403): retrying cannot help."""


class ProtocolError(Exception):
    """The server answered something this agent cannot act on."""


# --- layers: must build exactly what engine.space.LayerSpec.build_module builds -------------------


def make_activation(name: str) -> nn.Module:
    factories = {
        "relu": nn.ReLU,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "sigmoid": nn.Sigmoid,
        "relu6": nn.ReLU6,
        "leakyrelu": nn.LeakyReLU,
    }
    if name not in factories:
        raise ProtocolError(f"unknown activation {name!r}")
    return factories[name]()


def adaptive_pool_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] averaging matrix with the bins of adaptive average pooling (engine.ops)."""
    matrix = torch.zeros(out_size, in_size)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil division
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class FixedAvgPool2d(nn.Module):
    """Adaptive average pooling for one known input size as two matmuls (engine.ops.FixedAvgPool2d)."""

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.in_size = in_size
        self.out_size = out_size
        rows = adaptive_pool_matrix(in_size, out_size)
        self.register_buffer("rows", rows)
        self.register_buffer("cols_t", rows.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols_t)

    def extra_repr(self) -> str:
        return f"in_size={self.in_size}, out_size={self.out_size}"


def build_layer(spec: dict) -> nn.Module:
    """The eval-mode module of one layer spec dict (LayerSpec.to_dict())."""
    op = spec["op"]
    if op == "conv":
        kernel = int(spec["kernel"])
        module = nn.Sequential(
            nn.Conv2d(
                int(spec["in_channels"]),
                int(spec["out_channels"]),
                kernel,
                stride=int(spec["stride"]),
                padding=kernel // 2,
                bias=False,
            ),
            nn.BatchNorm2d(int(spec["out_channels"])),
            make_activation(spec["activation"]),
        )
    elif op == "shortcut":
        module = nn.Sequential(
            nn.Conv2d(
                int(spec["in_channels"]),
                int(spec["out_channels"]),
                1,
                stride=int(spec["stride"]),
                bias=False,
            ),
            nn.BatchNorm2d(int(spec["out_channels"])),
        )
    elif op == "head":
        pool = int(spec["pool_size"])
        module = nn.Sequential(
            FixedAvgPool2d(int(spec["in_size"]), pool),
            nn.Flatten(),
            nn.Linear(int(spec["in_channels"]) * pool * pool, int(spec["num_classes"])),
        )
    else:
        raise ProtocolError(f"unknown layer op {op!r}")
    return module.eval()


def layer_input_shape(spec: dict, batch_size: int) -> tuple:
    size = int(spec["in_size"])
    return (batch_size, int(spec["in_channels"]), size, size)


# --- timing: same protocol as engine.latency.measure ----------------------------------------------


def robust_median_ms(samples_ns: list) -> tuple:
    values = [v / 1e6 for v in samples_ns]
    median = statistics.median(values)
    mad = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values)
    kept = [v for v in values if abs(v - median) <= 3 * mad] if mad > 0 else values
    return statistics.median(kept), mad


def time_runnable(runnable, example, repeats: int, warmup: int, reference=None, base_ms=None) -> tuple:
    """(ms, scaled MAD): the robust median, or with ``reference`` the latency at the speed where
    the reference takes ``base_ms`` (median of this call's time / the reference call's just before)."""
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for _ in range(warmup):
            runnable(example)
        samples, ratios = [], []
        for _ in range(repeats):
            if reference is not None:
                before = clock()
                reference()
                reference_ns = clock() - before
            start = clock()
            runnable(example)
            samples.append(clock() - start)
            if reference is not None:
                ratios.append(samples[-1] / max(reference_ns, 1))
    median_ms, mad = robust_median_ms(samples)
    if reference is None:
        return median_ms, mad
    return statistics.median(ratios) * base_ms, mad


class SpeedReference:
    """Exactly engine.latency.measure.SpeedReference: a seeded 3x3 conv (32 channels, 14x14) + ReLU."""

    description = "conv3x3 32->32 on 1x32x14x14 + ReLU, TorchScript"

    def __init__(self) -> None:
        channels = 32
        generator = torch.Generator().manual_seed(0)
        conv = nn.utils.skip_init(nn.Conv2d, channels, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.zero_()
        self.module = script(nn.Sequential(conv, nn.ReLU()).eval())
        self.input = torch.randn((1, channels, 14, 14), generator=generator)
        with torch.inference_mode():  # TorchScript specialises during the first calls: not timed
            for _ in range(5):
                self()

    def __call__(self):
        return self.module(self.input)

    def calibrate(self, calls: int = 300) -> float:
        return time_runnable(lambda _: self(), None, calls, 20)[0]


def example_input(shape) -> torch.Tensor:
    return torch.randn(tuple(int(s) for s in shape), generator=torch.Generator().manual_seed(0))


class LayerProfiler:
    """Times layer specs; compiles one TorchScript module per layer structure and reloads tensors."""

    def __init__(self, batch_size: int, repeats: int, warmup: int, reference=None, base_ms=None) -> None:
        self.batch_size = batch_size
        self.repeats = repeats
        self.warmup = warmup
        self.reference = reference
        self.base_ms = base_ms
        self._compiled: dict = {}

    @staticmethod
    def _structure(spec: dict) -> tuple:
        return (
            spec["op"],
            spec.get("kernel"),
            spec.get("stride"),
            spec.get("activation"),
            spec.get("pool_size"),
        )

    @staticmethod
    def _load_tensors(scripted, module: nn.Module) -> None:
        for name, tensor in module.state_dict(keep_vars=True).items():
            path, _, leaf = name.rpartition(".")
            target = scripted
            for part in filter(None, path.split(".")):
                target = getattr(target, part)
            setattr(target, leaf, tensor)

    def measure(self, spec: dict) -> float:
        with torch.inference_mode():
            module = build_layer(spec)
            example = example_input(layer_input_shape(spec, self.batch_size))
            key = self._structure(spec)
            runnable = self._compiled.get(key)
            if runnable is not None:
                self._load_tensors(runnable, module)
                expected = module(example)
                try:
                    got = runnable(example)
                except RuntimeError:
                    got = None
                if got is None or got.shape != expected.shape or not torch.allclose(got, expected):
                    runnable = None
            if runnable is None:
                runnable = script(module)
                self._compiled[key] = runnable
        ms, _ = time_runnable(runnable, example, self.repeats, self.warmup, self.reference, self.base_ms)
        return ms


def script(module: nn.Module):
    with warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript deprecated; it is still what nasweb deploys.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def call_overhead_ms(batch_size: int) -> float:
    runnable = script(_Identity())
    return time_runnable(runnable, example_input((batch_size, 1, 8, 8)), 200, 20)[0]


# --- HTTP -------------------------------------------------------------------------------------------


class Client:
    def __init__(
        self,
        server: str,
        token: str,
        *,
        timeout: float,
        backoff: float,
        max_backoff: float,
        max_attempts: int,
        log,
    ) -> None:
        self.server = server.rstrip("/") + "/"
        self.token = token
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.log = log

    def url(self, path: str) -> str:
        return urllib.parse.urljoin(self.server, path.lstrip("/") if not path.startswith("http") else path)

    def _once(self, method: str, path: str, body):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method=method)
        request.add_header("Authorization", f"Device {self.token}")
        request.add_header("User-Agent", f"nasweb-agent/{AGENT_VERSION}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def request(self, method: str, path: str, body=None, *, accept=(200,)):
        """Send with retries; returns (status, raw bytes) for statuses in ``accept``."""
        delay = self.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                status, raw = self._once(method, path, body)
            except (urllib.error.URLError, OSError, TimeoutError) as error:
                status, raw = None, str(error).encode()
            if status in accept:
                return status, raw
            if status in (401, 403):
                raise AuthRejected(f"{method} {path}: HTTP {status} {raw[:200]!r}")
            if status is not None and status not in RETRYABLE_STATUS:
                raise ProtocolError(f"{method} {path}: HTTP {status} {raw[:300]!r}")
            if self.max_attempts and attempt >= self.max_attempts:
                raise ProtocolError(
                    f"{method} {path}: giving up after {attempt} attempts ({status}, {raw[:200]!r})"
                )
            self.log(
                f"{method} {path} failed ({status or raw.decode(errors='replace')}); retrying in {delay:.1f}s"
            )
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def json(self, method: str, path: str, body=None, *, accept=(200,)):
        status, raw = self.request(method, path, body, accept=accept)
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError as error:
            raise ProtocolError(f"{method} {path}: invalid JSON: {error}") from None


# --- the job ----------------------------------------------------------------------------------------


def device_metadata(threads: int) -> dict:
    return {
        "agent_version": AGENT_VERSION,
        "runtime": "torchscript",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": threads,
    }


def _positive_int(job: dict, name: str, default: int, minimum: int = 1) -> int:
    value = job.get(name, default)
    if not isinstance(value, int) or value < minimum:
        raise ProtocolError(f"job field {name!r} must be an int >= {minimum}, got {value!r}")
    return value


def run_job(client: Client, job: dict, *, threads_override, batch_size_post: int, log) -> bool:
    """Measure what the job still lacks; True when the server accepted completion."""
    job_id = job["job_id"]
    batch_size = _positive_int(job, "batch_size", 1)
    repeats = _positive_int(job, "repeats", 20)
    warmup = _positive_int(job, "warmup", 5, minimum=0)
    threads = threads_override or _positive_int(job, "threads", torch.get_num_threads())
    torch.set_num_threads(threads)
    done = set(job.get("done_keys", []))
    todo = [layer for layer in job.get("layers", []) if layer["key"] not in done]
    log(
        f"job {job_id}: {len(job.get('layers', []))} layers, {len(done)} done, {len(todo)} to measure, "
        f"threads={threads}"
    )
    reference, base_ms = speed_reference(client, job, log)
    profiler = LayerProfiler(batch_size, repeats, warmup, reference, base_ms)
    pending: list = []

    def flush() -> None:
        if pending:
            body = {"batch_id": str(uuid.uuid4()), "results": list(pending)}
            client.json("POST", f"/api/agent/jobs/{job_id}/results", body)
            log(f"posted {len(pending)} results")
            pending.clear()

    for index, layer in enumerate(todo, start=1):
        ms = profiler.measure(layer["spec"])
        for _ in range(3):  # a zero or non-finite median is a timer glitch: measure again
            if math.isfinite(ms) and ms > 0:
                break
            ms = profiler.measure(layer["spec"])
        else:
            raise ProtocolError(f"layer {layer['key']} gave no valid timing ({ms!r})")
        pending.append({"key": layer["key"], "ms": ms})
        if len(pending) >= batch_size_post or index == len(todo):
            flush()

    done_models = set(job.get("done_models", []))
    for model in job.get("models", []):
        if model["model_id"] in done_models:
            continue
        ms = measure_model_file(
            client,
            model,
            repeats=max(repeats, 20),
            warmup=max(warmup, 5),
            reference=reference,
            base_ms=base_ms,
        )
        client.json("POST", f"/api/agent/jobs/{job_id}/models/{model['model_id']}/result", {"ms": ms})
        log(f"model {model['model_id']}: {ms:.4f} ms")

    body = {"call_overhead_ms": call_overhead_ms(batch_size), "metadata": device_metadata(threads)}
    status, answer = client.json("POST", f"/api/agent/jobs/{job_id}/complete", body, accept=(200, 409))
    if status == 409:
        log(f"server says job {job_id} is incomplete: {answer}")
        return False
    return True


def speed_reference(client: Client, job: dict, log) -> tuple:
    """(reference, base ms) for this job, or (None, None) for a job made without one (its owner
    chose raw medians) or from a server that predates them.

    The first agent run calibrates the base and posts it; the server keeps the first one it gets
    and hands it to every later run of the job, so a resumed profile stays in one unit."""
    if "reference_ms" not in job:
        log("no speed reference for this job: timings are raw medians")
        return None, None
    reference = SpeedReference()
    base_ms = job["reference_ms"]
    if base_ms is None:
        calibrated = reference.calibrate()
        _, answer = client.json(
            "POST", f"/api/agent/jobs/{job['job_id']}/reference", {"reference_ms": calibrated}
        )
        base_ms = (answer or {}).get("reference_ms")
    if (
        not isinstance(base_ms, (int, float))
        or isinstance(base_ms, bool)
        or not (math.isfinite(base_ms) and base_ms > 0)
    ):
        raise ProtocolError(f"reference_ms must be a finite positive number, got {base_ms!r}")
    log(f"speed reference: {reference.description}, timings at {base_ms:.4f} ms per reference call")
    return reference, float(base_ms)


def measure_model_file(
    client: Client, model: dict, *, repeats: int, warmup: int, reference=None, base_ms=None
) -> float:
    _, raw = client.request("GET", model["url"])
    handle, path = tempfile.mkstemp(prefix="nasweb-model-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(raw)
        runnable = torch.jit.load(path, map_location="cpu").eval()
    finally:
        os.unlink(path)
    ms, _ = time_runnable(runnable, example_input(model["input_shape"]), repeats, warmup, reference, base_ms)
    return ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="nasweb board agent: layer-wise latency profiling")
    parser.add_argument("--server", required=True, help="base URL of the nasweb server")
    parser.add_argument("--token", required=True, help="device token shown when the board was registered")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the job's)")
    parser.add_argument("--once", action="store_true", help="finish the current job (if any) and exit")
    parser.add_argument("--batch", type=int, default=20, help="results per POST")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between polls when idle")
    parser.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay")
    parser.add_argument("--max-attempts", type=int, default=0, help="tries per request (0 = forever)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.batch < 1:
        parser.error("--batch must be >= 1")

    def log(message: str) -> None:
        print(f"[nasweb-agent {time.strftime('%H:%M:%S')}] {message}", flush=True)

    client = Client(
        args.server,
        args.token,
        timeout=args.timeout,
        backoff=args.backoff,
        max_backoff=args.max_backoff,
        max_attempts=args.max_attempts,
        log=log,
    )
    incomplete_rounds = 0
    try:
        while True:
            status, job = client.json("GET", "/api/agent/job", accept=(200, 204))
            if status == 204 or not job:
                if args.once:
                    log("no job waiting")
                    return 0
                time.sleep(args.poll)
                continue
            if not run_job(client, job, threads_override=args.threads, batch_size_post=args.batch, log=log):
                incomplete_rounds += 1  # fetch the job again: its done_keys show what was lost
                if incomplete_rounds >= 3:
                    raise ProtocolError(f"job {job['job_id']} still incomplete after 3 rounds")
                continue
            incomplete_rounds = 0
            log(f"job {job['job_id']} complete")
            if args.once:
                return 0
    except AuthRejected as error:
        log(f"token rejected: {error}")
        return 2
    except (ProtocolError, KeyError, TypeError, ValueError) as error:
        log(f"error: {error!r}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
