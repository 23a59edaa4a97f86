"""Retries, ejection and probe-back, and admission (queue full, shedding) with real engines."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from shoal.router.metrics import sample_value


def _post(url: str, priority: str | None = None, max_tokens: int = 2) -> httpx.Response:
    headers = {"x-shoal-priority": priority} if priority else {}
    return httpx.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": "retry me please", "max_tokens": max_tokens,
              "min_tokens": max_tokens, "ignore_eos": True},
        headers=headers,
        timeout=60,
    )  # fmt: skip


def test_failing_engine_is_retried_ejected_and_probed_back(spawn: Any) -> None:
    good, bad = spawn.sim(), spawn.sim()
    # A cool-down long enough that a loaded CI machine still reads the ejection before it ends.
    config = {"eject_after_failures": 2, "eject_seconds": 5.0, "max_attempts": 3}
    r = spawn.router([good.url, bad.url], "--strategy", "round-robin", config=config)
    bad.faults(error_rate=1.0)
    served = []
    for _ in range(10):
        resp = _post(r.url)
        assert resp.status_code == 200, resp.text  # no client-visible error
        served.append(resp.headers["x-shoal-endpoint"])
    assert set(served) == {good.url}
    text = r.metrics()
    assert (sample_value(text, "shoal_router_retries_total", {"model": "tiny"}) or 0) >= 2
    assert sample_value(text, "shoal_router_ejections_total", {"endpoint": bad.url}) == 1
    assert sample_value(text, "shoal_router_endpoint_ejected", {"endpoint": bad.url}) == 1
    # Heal it; after the cool-down a probe brings it back into rotation.
    bad.faults(error_rate=0.0)
    time.sleep(5.5)
    served = [_post(r.url).headers["x-shoal-endpoint"] for _ in range(6)]
    assert bad.url in served
    assert sample_value(r.metrics(), "shoal_router_endpoint_ejected", {"endpoint": bad.url}) == 0


def test_killed_engine_is_routed_around(spawn: Any) -> None:
    a, b = spawn.sim(), spawn.sim()
    r = spawn.router([a.url, b.url], "--strategy", "round-robin")
    b.kill()
    for _ in range(6):
        resp = _post(r.url)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-shoal-endpoint"] == a.url


def test_full_queue_sheds_sheddable_first(spawn: Any) -> None:
    sim = spawn.sim()
    config = {
        "queue_size": 2,
        "saturation": {"max_in_flight_per_endpoint": 1},
        "queue_timeouts": {"critical": 30, "standard": 30, "sheddable": 30},
    }
    r = spawn.router([sim.url], config=config)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            sim.faults(stall_seconds=3.0)  # the engine's next step hangs for 3 s
            busy = pool.submit(_post, r.url, "standard", 3)
            time.sleep(0.5)  # occupies the only slot
            shed_a = pool.submit(_post, r.url, "sheddable", 1)
            time.sleep(0.2)
            shed_b = pool.submit(_post, r.url, "sheddable", 1)
            time.sleep(0.2)  # the queue (2) is full of sheddable requests
            std = pool.submit(_post, r.url, "standard", 1)  # displaces the newest sheddable
            time.sleep(0.2)
            late = pool.submit(_post, r.url, "sheddable", 1)  # full of better: refused
            late_resp = late.result()
            assert late_resp.status_code == 429
            assert late_resp.headers["retry-after"]
            assert late_resp.json()["error"]["code"] == "queue_full"
            shed_resp = shed_b.result()
            assert shed_resp.status_code == 429
            assert shed_resp.json()["error"]["code"] == "shed"
            assert busy.result().status_code == 200
            assert std.result().status_code == 200
            assert shed_a.result().status_code == 200
    finally:
        sim.faults(stall_seconds=0.0)
    text = r.metrics()
    assert sample_value(text, "shoal_router_rejections_total", {"reason": "shed"}) == 1
    assert sample_value(text, "shoal_router_queue_depth", {"model": "tiny"}) == 0


class _TruncatingEngine(BaseHTTPRequestHandler):
    """Answers the router's scrapes like an idle engine. A completion gets a declared length of
    100 bytes of which it sends 12, a streamed one a first event; then the connection closes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            card = b'{"id": "tiny", "object": "model", "root": "tiny", "parent": null}'
            self._send(200, b'{"object": "list", "data": [' + card + b"]}", "application/json")
        elif self.path == "/metrics":
            self._send(200, b'vllm:num_requests_running{model_name="tiny"} 0.0\n', "text/plain")
        else:
            self._send(404, b"{}", "application/json")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if json.loads(body).get("stream"):
            event = b'data: {"choices": [{"text": " w1"}]}\n\n'
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % len(event) + event + b"\r\n"
            )
        else:
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b'content-length: 100\r\n\r\n{"id": "cmpl'
            )
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def truncating_engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TruncatingEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_engine_failing_mid_body_gives_the_client_an_incomplete_response(
    spawn: Any, truncating_engine: str
) -> None:
    """A body or stream cut short must not look complete (a 200 with half a JSON, or a stream
    without [DONE]): the router closes the client's connection, and keeps serving."""
    r = spawn.router([truncating_engine], "--strategy", "round-robin")
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "x", "stream": stream}
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(r.url + "/v1/completions", json=body, timeout=30)
    assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    while "failed mid-response" not in r.tail():
        assert time.monotonic() < deadline, r.tail()
        time.sleep(0.1)
