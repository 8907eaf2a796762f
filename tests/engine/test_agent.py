"""The board agent as a real subprocess against a loopback server speaking docs/AGENT_PROTOCOL.md."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from engine.agent import nasweb_agent
from engine.space import LayerSpec, SearchSpace

AGENT = Path(nasweb_agent.__file__)
TOKEN = "device-token-for-tests"


def tiny_layers(count):
    """``count`` real conv LayerSpecs on 8x8 inputs plus one head, as the job lists them."""
    activations = ("relu", "elu", "selu", "sigmoid", "relu6", "leakyrelu")
    specs = [
        LayerSpec("conv", 8, 1 + i % 3, 2 + i % 5, (1, 3, 5)[i % 3], 1 + i % 2, activations[i % 6])
        for i in range(count)
    ]
    specs.append(LayerSpec("head", 2, 4, 5, 0, 0, pool_size=5, num_classes=5))
    return [{"key": spec.key, "spec": spec.to_dict()} for spec in specs]


class ProtocolServer:
    """A minimal in-memory implementation of the server side of the agent protocol."""

    def __init__(self, layers, *, model_path=None, hold_on_batch=None, lose_batch=None, legacy=False):
        self.legacy = legacy  # a server from before speed references: no reference_ms, no endpoint
        self.reference_ms = None
        self.reference_posts: list[float] = []
        self.layers = {layer["key"]: layer for layer in layers}
        self.order = [layer["key"] for layer in layers]
        self.results: dict[str, float] = {}
        self.post_counts: dict[str, int] = {}
        self.batches: set[str] = set()
        self.result_posts = 0
        self.model_path = model_path
        self.model_results: dict[str, float] = {}
        self.complete_body = None
        self.hold_on_batch = hold_on_batch  # block this (1-based) results POST until released
        self.lose_batch = lose_batch  # answer this results POST with 200 but store nothing
        self.holding = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def job(self):
        models = []
        if self.model_path is not None:
            models.append({"model_id": "m1", "url": "/files/m1.pt", "input_shape": [1, 1, 8, 8]})
        job = {
            "job_id": "job-1",
            "batch_size": 1,
            "repeats": 3,
            "warmup": 1,
            "threads": 1,
            "layers": [self.layers[key] for key in self.order],
            "done_keys": sorted(self.results),
            "models": models,
            "done_models": sorted(self.model_results),
        }
        if not self.legacy:
            job["reference_ms"] = self.reference_ms
        return job

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status, body=None, raw=None):
                payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _authorized(self):
                if self.headers.get("Authorization") != f"Device {TOKEN}":
                    self._send(HTTPStatus.UNAUTHORIZED, {"error": "bad token"})
                    return False
                return True

            def _body(self):
                length = int(self.headers.get("Content-Length", 0))
                return json.loads(self.rfile.read(length) or b"{}")

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path == "/api/agent/job":
                    if server.complete_body is not None:
                        return self._send(HTTPStatus.NO_CONTENT)
                    return self._send(HTTPStatus.OK, server.job())
                if self.path == "/files/m1.pt" and server.model_path is not None:
                    return self._send(HTTPStatus.OK, raw=server.model_path.read_bytes())
                self._send(HTTPStatus.NOT_FOUND, {"error": "no such path"})

            def do_POST(self):
                if not self._authorized():
                    return
                body = self._body()
                if self.path == "/api/agent/jobs/job-1/results":
                    return self._results(body)
                if self.path == "/api/agent/jobs/job-1/models/m1/result":
                    ms = body.get("ms")
                    if not (isinstance(ms, float) and math.isfinite(ms) and ms > 0):
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": "bad ms"})
                    server.model_results["m1"] = ms
                    return self._send(HTTPStatus.OK, {"stored": True})
                if self.path == "/api/agent/jobs/job-1/reference" and not server.legacy:
                    server.reference_posts.append(body["reference_ms"])
                    if server.reference_ms is None:  # the first one is kept
                        server.reference_ms = body["reference_ms"]
                    return self._send(HTTPStatus.OK, {"reference_ms": server.reference_ms})
                if self.path == "/api/agent/jobs/job-1/complete":
                    missing = [key for key in server.order if key not in server.results]
                    if missing:
                        return self._send(HTTPStatus.CONFLICT, {"missing": missing})
                    server.complete_body = body
                    return self._send(HTTPStatus.OK, {"complete": True})
                self._send(HTTPStatus.NOT_FOUND, {"error": "no such path"})

            def _results(self, body):
                with server.lock:
                    server.result_posts += 1
                    number = server.result_posts
                if number == server.hold_on_batch:
                    server.holding.set()
                    server.release.wait(timeout=60)
                    try:  # the agent was killed meanwhile: nobody is listening any more
                        self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "held"})
                    except OSError:
                        pass
                    return None
                results = body.get("results")
                batch_id = body.get("batch_id")
                if not isinstance(batch_id, str) or not isinstance(results, list):
                    return self._send(HTTPStatus.BAD_REQUEST, {"error": "malformed"})
                for item in results:
                    ms = item.get("ms")
                    if item.get("key") not in server.layers or not (
                        isinstance(ms, float) and math.isfinite(ms) and ms > 0
                    ):
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": f"bad result {item!r}"})
                if number == server.lose_batch:
                    return self._send(HTTPStatus.OK, {"stored": len(results)})
                with server.lock:
                    if batch_id not in server.batches:
                        server.batches.add(batch_id)
                        for item in results:
                            server.results[item["key"]] = item["ms"]
                            server.post_counts[item["key"]] = server.post_counts.get(item["key"], 0) + 1
                self._send(HTTPStatus.OK, {"stored": len(results)})

        return Handler


def agent_command(url, *extra, token=TOKEN):
    return [
        sys.executable,
        str(AGENT),
        "--server",
        url,
        "--token",
        token,
        "--threads",
        "1",
        "--once",
        "--batch",
        "5",
        "--backoff",
        "0.2",
        "--max-backoff",
        "0.5",
        *extra,
    ]


def test_agent_imports_only_torch_and_stdlib():
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"torch"}


def test_agent_killed_halfway_resumes_and_completes(tmp_path):
    model = nasweb_agent.script(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval())
    model_path = tmp_path / "m1.pt"
    model.save(str(model_path))
    layers = tiny_layers(24)
    with ProtocolServer(layers, model_path=model_path, hold_on_batch=3) as server:
        first = subprocess.Popen(
            agent_command(server.url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path
        )
        try:
            assert server.holding.wait(timeout=60), "agent never reached its third batch"
        finally:
            first.kill()
            first.wait(timeout=10)
        server.release.set()
        stored_before = dict(server.results)
        assert len(stored_before) == 10  # two batches of five
        assert server.complete_body is None

        second = subprocess.run(
            agent_command(server.url), capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert second.returncode == 0, second.stdout + second.stderr
        assert set(server.results) == {layer["key"] for layer in layers}
        assert all(math.isfinite(ms) and ms > 0 for ms in server.results.values())
        assert {key: server.results[key] for key in stored_before} == stored_before
        assert all(count == 1 for count in server.post_counts.values())  # nothing measured twice
        assert "15 to measure" in second.stdout  # 24 convs + head - 10 stored
        assert server.model_results["m1"] > 0
        body = server.complete_body
        assert body["call_overhead_ms"] > 0 and body["metadata"]["threads"] == 1
        assert body["metadata"]["torch"] == torch.__version__
        # The first run calibrated the speed reference; the resumed one took the stored base.
        assert len(server.reference_posts) == 1 and server.reference_ms > 0
        assert "timings at" in second.stdout


def test_agent_against_a_server_without_speed_references_times_raw(tmp_path):
    layers = tiny_layers(3)
    with ProtocolServer(layers, legacy=True) as server:
        done = subprocess.run(
            agent_command(server.url), capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(server.results) == {layer["key"] for layer in layers} and not server.reference_posts
    # No reference line ("speed reference: ..., timings at ... ms"); the raw-medians line instead.
    assert "timings at" not in done.stdout
    assert "no speed reference for this job: timings are raw medians" in done.stdout


def test_agent_speed_reference_is_the_engines_and_scales_timings_to_the_base():
    from engine.latency.measure import SpeedReference

    engine_reference, agent_reference = SpeedReference(), nasweb_agent.SpeedReference()
    assert agent_reference.description == engine_reference.description
    with torch.inference_mode():
        assert torch.equal(agent_reference(), engine_reference())  # same seeded weights and input
    layer = tiny_layers(1)[0]
    profiler = nasweb_agent.LayerProfiler(1, repeats=20, warmup=2, reference=agent_reference, base_ms=1.0)
    profiler.measure(layer["spec"])  # compiles the layer: that first timing is not compared
    at_one = profiler.measure(layer["spec"])
    profiler.base_ms = 3.0
    at_three = profiler.measure(layer["spec"])
    assert at_one > 0 and at_three == pytest.approx(3 * at_one, rel=0.5)  # a unit, two timings


def test_agent_retries_until_server_comes_up(tmp_path):
    layers = tiny_layers(3)
    placeholder = ProtocolServer(layers)
    port = placeholder.httpd.server_address[1]
    placeholder.httpd.server_close()  # nothing listens on the port: connections are refused
    agent = subprocess.Popen(
        agent_command(f"http://127.0.0.1:{port}", "--timeout", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("retrying" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("retrying" in line for line in lines), "the agent never retried"
    server = ProtocolServer(layers)
    server.httpd.server_close()
    server.httpd = ThreadingHTTPServer(("127.0.0.1", port), server._handler())
    server.thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    with server:
        agent.wait(timeout=120)
        reader.join(timeout=10)
    assert agent.returncode == 0, "".join(lines)
    assert set(server.results) == {layer["key"] for layer in layers}


def test_agent_refetches_job_when_server_reports_missing_keys(tmp_path):
    layers = tiny_layers(9)
    with ProtocolServer(layers, lose_batch=1) as server:
        done = subprocess.run(
            agent_command(server.url), capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
    assert done.returncode == 0, done.stdout
    assert "incomplete" in done.stdout
    assert set(server.results) == {layer["key"] for layer in layers}
    assert server.complete_body is not None


def test_agent_with_rejected_token_exits_2_and_posts_nothing(tmp_path):
    with ProtocolServer(tiny_layers(2)) as server:
        done = subprocess.run(
            agent_command(server.url, token="forged"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert done.returncode == 2, done.stdout
    assert server.results == {}


def test_agent_once_without_job_exits_0(tmp_path):
    with ProtocolServer(tiny_layers(1)) as server:
        server.complete_body = {}  # nothing pending: GET /api/agent/job answers 204
        done = subprocess.run(
            agent_command(server.url), capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
    assert done.returncode == 0, done.stdout
    assert "no job waiting" in done.stdout


def test_profiler_template_reuse_matches_fresh_module():
    profiler = nasweb_agent.LayerProfiler(batch_size=1, repeats=2, warmup=1)
    for layer in tiny_layers(12):
        assert profiler.measure(layer["spec"]) > 0
    # one compiled module per structure, not per layer
    assert len(profiler._compiled) < 12


def test_robust_median_rejects_outliers():
    samples = [1_000_000] * 9 + [50_000_000]
    median, mad = nasweb_agent.robust_median_ms(samples)
    assert median == pytest.approx(1.0) and mad == 0.0
    samples = [1_000_000, 1_100_000, 900_000, 1_050_000, 950_000, 90_000_000]
    median, _ = nasweb_agent.robust_median_ms(samples)
    assert median == pytest.approx(1.0)


def sample_specs():
    """Every op and activation, from both backbones (first layer, middle, shortcut, every head)."""
    picked = {}
    for space in (SearchSpace.vgg9(), SearchSpace.resnet12(image_size=16)):
        for spec in space.all_layer_specs():
            signature = (spec.op, spec.activation, spec.kernel, spec.in_size)
            picked.setdefault(signature, spec)
    return list(picked.values())


def test_agent_builds_exactly_the_layerspec_modules():
    specs = sample_specs()
    assert {s.op for s in specs} == {"conv", "shortcut", "head"}
    for spec in specs:
        reference = spec.build_module()
        built = nasweb_agent.build_layer(spec.to_dict())
        assert [type(m).__name__ for m in built] == [type(m).__name__ for m in reference]
        assert str(built) == str(reference)
        ours, theirs = built.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():  # buffers built by the agent itself must match
            assert tensor.shape == theirs[name].shape, (spec.key, name)
            if "rows" in name or "cols_t" in name or "running" in name:
                assert torch.equal(tensor, theirs[name]), (spec.key, name)
        built.load_state_dict(theirs)
        example = spec.example_input(2)
        assert tuple(nasweb_agent.layer_input_shape(spec.to_dict(), 2)) == tuple(example.shape)
        with torch.no_grad():
            assert torch.equal(built(example), reference(example)), spec.key
        assert built.training is False
