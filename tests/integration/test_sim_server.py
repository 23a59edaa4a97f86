"""``shoal sim`` behaviour beyond the recorded contract: disconnects, faults, router probes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ARGS = ["--model", "tiny", "--served-model-name", "tiny", "--block-size", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sim:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = _free_port()
        log = tmp / f"sim-{self.port}.log"
        argv = [sys.executable, "-m", "shoal", "sim", "--port", str(self.port), *ARGS, *extra]
        # cwd outside the checkout, where ``shoal`` would resolve to the unmapped source folder.
        self.proc = subprocess.Popen(argv, cwd=tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "shoal sim did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    s = Sim(tmp_path_factory.mktemp("sim"))
    yield s
    s.stop()


def _engine_busy(client: httpx.Client) -> int:
    stats = client.get("/admin/state").json()["engine"]
    return int(stats["num_running"] + stats["num_waiting"])


LONG = {
    "model": "tiny",
    "prompt": "hello world",
    "max_tokens": 1500,
    "min_tokens": 1500,
    "ignore_eos": True,
}


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_engine_request(sim: Sim, stream: bool) -> None:
    with httpx.Client(base_url=sim.url, timeout=30) as admin:
        admin.post("/admin/faults", json={"slowdown": 100.0})
        try:
            with httpx.Client(base_url=sim.url, timeout=httpx.Timeout(30, read=1.0)) as c:
                if stream:
                    with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                        # Hold the iterator: dropping it closes the connection, and the engine
                        # could abort before the check.
                        body_chunks = r.iter_bytes()
                        next(body_chunks)
                        assert _engine_busy(admin) == 1
                    # Leaving the block closes the response mid-stream: the client leaves here.
                else:
                    # Non-streamed: nothing comes back until the end. A raw socket stays
                    # connected until it is closed, so the check runs while the client waits.
                    body = json.dumps(LONG).encode()
                    head = (
                        f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{sim.port}\r\n"
                        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                    )
                    with socket.create_connection(("127.0.0.1", sim.port)) as raw:
                        raw.sendall(head.encode() + body)
                        until = time.monotonic() + 5
                        while not _engine_busy(admin) and time.monotonic() < until:
                            time.sleep(0.02)
                        assert _engine_busy(admin) == 1
                    # The socket is closed: the client left.
            # The connection is gone: the engine must drop the request promptly.
            deadline = time.monotonic() + 5
            while _engine_busy(admin) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _engine_busy(admin) == 0
        finally:
            admin.post("/admin/faults", json={"slowdown": 1.0})


def test_error_rate_fault(sim: Sim) -> None:
    with httpx.Client(base_url=sim.url, timeout=30) as c:
        assert c.post("/admin/faults", json={"error_rate": 1.0}).status_code == 200
        try:
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "InternalServerError"
            assert c.get("/admin/state").json()["faults"]["error_rate"] == 1.0
        finally:
            c.post("/admin/faults", json={"error_rate": 0.0})
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_gpu_limits(sim: Sim) -> None:
    with httpx.Client(base_url=sim.url, timeout=30) as c:
        r = c.post("/admin/gpu", json={"clock_lock_mhz": 1200, "power_cap_watts": None})
        assert r.status_code == 200 and r.json()["clock_lock_mhz"] == 1200
        state = c.get("/admin/state").json()
        assert state["gpu"]["clock_lock_mhz"] == 1200
        bad = c.post("/admin/gpu", json={"clock_lock_mhz": 1, "power_cap_watts": None})
        assert bad.status_code == 400
        c.post("/admin/gpu", json={"clock_lock_mhz": None, "power_cap_watts": None})


def test_router_probe_endpoints(sim: Sim) -> None:
    """SGLang's router registers a worker through /health and /get_server_info; on by default."""
    with httpx.Client(base_url=sim.url, timeout=30) as c:
        info = c.get("/get_server_info").json()
        assert info["dp_size"] == 1 and info["model_path"] == "tiny"
        assert c.get("/get_model_info").json()["is_generation"] is True
        assert c.get("/health_generate").status_code == 200
        load = c.get("/get_load").json()
        assert load[0]["dp_rank"] == 0 and load[0]["num_reqs"] >= 0


def test_router_compat_off_is_vllm(tmp_path: Path) -> None:
    s = Sim(tmp_path, "--no-router-compat")
    try:
        r = httpx.get(s.url + "/get_server_info")
        assert r.status_code == 404 and r.text == '{"detail":"Not Found"}'
    finally:
        s.stop()


def test_crash_fault_exits_after_responding(tmp_path: Path) -> None:
    s = Sim(tmp_path)
    try:
        r = httpx.post(s.url + "/admin/faults", json={"crash": True}, timeout=10)
        assert r.status_code == 200 and r.json()["crash"] is True
        assert s.proc.wait(timeout=10) == 1
    finally:
        s.stop()


def test_body_limit(tmp_path: Path) -> None:
    s = Sim(tmp_path, "--max-body-bytes", "1000")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "w1 " * 1000})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == 413
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
