"""Real processes for the router's integration tests (used by conftest.py fixtures): ``shoal sim``
engines, ``redis-server`` and routers, each on a free loopback port, stopped by PID.

Processes start with cwd outside the checkout (its ``operator/`` folder would shadow the
standard library).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

BIN = Path(sys.executable).parent
SIM_ARGS = [
    "--model", "tiny", "--gpu", "H100", "--max-model-len", "2048",
    "--num-gpu-blocks-override", "4096", "--block-size", "16",
]  # fmt: skip
ROUTER_LAUNCHER = (
    "import argparse, logging, sys\n"
    "from shoal.router.cli import add_router_arguments, run_router\n"
    "p = argparse.ArgumentParser(); add_router_arguments(p)\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "logging.basicConfig(level='INFO', format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    "sys.exit(run_router(a))\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process we started; stopped by its PID only."""

    def __init__(self, argv: Sequence[str], cwd: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_http(url: str, proc: Proc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.alive(), proc.tail()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up:\n{proc.tail()}"
        time.sleep(0.05)


class Sim(Proc):
    def __init__(
        self, tmp: Path, *extra: str, kv_events: bool = False, port: int | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [*SIM_ARGS, *extra]
        if kv_events:
            self.kv_port = free_port()
            config = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://127.0.0.1:{self.kv_port}",
            }
            args += ["--kv-events-config", json.dumps(config)]
        argv = [str(BIN / "shoal"), "sim", "--host", "127.0.0.1", "--port", str(self.port), *args]
        super().__init__(argv, tmp, tmp / f"sim-{self.port}.log")

    def wait(self) -> Sim:
        wait_http(self.url + "/health", self)
        return self

    def faults(self, **faults: Any) -> None:
        httpx.post(self.url + "/admin/faults", json=faults, timeout=5).raise_for_status()


class Redis(Proc):
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (scripts/test installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
        super().__init__(argv, tmp, tmp / f"redis-{self.port}.log")
        deadline = time.monotonic() + 10
        while True:
            assert self.alive(), self.tail()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.tail()
            time.sleep(0.05)


class Router(Proc):
    def __init__(
        self,
        tmp: Path,
        endpoints: Sequence[str],
        *args: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-c", ROUTER_LAUNCHER, "--port", str(self.port)]
        if endpoints:
            argv += ["--endpoints", ",".join(endpoints)]
        if config is not None:
            path = tmp / f"router-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
            argv += ["--config", str(path)]
        argv += ["--scrape-interval-ms", "100", *args]
        super().__init__(argv, tmp, tmp / f"router-{self.port}.log")

    def wait(self, models: int = 1) -> Router:
        wait_http(self.url + "/health", self)
        deadline = time.monotonic() + 20
        # Ready for tests once it has scraped the engines (models known, metrics fresh).
        while True:
            health = httpx.get(self.url + "/health", timeout=2).json()
            listed = httpx.get(self.url + "/v1/models", timeout=2).json()["data"]
            if len(listed) >= models and health["healthy_endpoints"] == health["endpoints"]:
                return self
            assert time.monotonic() < deadline, self.tail()
            time.sleep(0.05)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text
