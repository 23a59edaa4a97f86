"""``shoal up``: a tiny Model starts, serves a completion through the router, stops on SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shoal.local import shoal_executable

TINY_MODEL = """
apiVersion: shoal.dev/v1alpha1
kind: Model
metadata: {name: tiny}
spec:
  model: {name: tiny, servedName: tiny}
  engine: {kind: sim}
  pools:
    - {name: a, gpuType: H100, replicas: 1}
    - {name: b, gpuType: L4, replicas: 1}
  routing: {strategy: prefix}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up_argv(cwd: Path, *args: str) -> list[str]:
    """``shoal up ARGS``; the same function directly where this checkout's CLI lacks ``up``."""
    help_text = subprocess.run(
        [*shoal_executable(), "--help"], capture_output=True, text=True, cwd=cwd, check=False
    ).stdout
    if " up " in help_text or "{up" in help_text or ",up" in help_text:
        return [*shoal_executable(), "up", *args]
    return [
        sys.executable,
        "-c",
        "import sys, argparse, shoal.local as m; p = argparse.ArgumentParser(); "
        "m.add_up_arguments(p); sys.exit(m.run_up(p.parse_args(sys.argv[1:])))",
        *args,
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) no longer runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_up_serves_and_stops_every_child(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(TINY_MODEL)
    port = _free_port()
    log = (tmp_path / "up.log").open("wb")
    argv = _up_argv(
        tmp_path, "-f", str(model), "--port", str(port), "--log-dir", str(tmp_path / "logs")
    )
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.2)
        children = _children_of(proc.pid)
        assert len(children) == 3  # two engines and the router

        body = {"model": "tiny", "prompt": "w1 w2 w3 w4", "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert r.headers["x-shoal-endpoint"].startswith("http://127.0.0.1:")
        # `shoal up` prints the URL once its own readiness check passes, which may come a moment
        # after the router first answers the test's probe.
        deadline = time.monotonic() + 30
        while True:
            out = (tmp_path / "up.log").read_text()
            if url in out and "curl" in out:
                break
            assert time.monotonic() < deadline, out[-3000:]
            time.sleep(0.2)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [c for c in children if _alive(c)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)


def test_up_reports_a_busy_port(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(TINY_MODEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        argv = _up_argv(tmp_path, "-f", str(model), "--port", str(busy))
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"router ({busy})" in done.stderr and "already in use" in done.stderr


def test_up_rejects_an_invalid_model(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(TINY_MODEL.replace("H100", "H900"))
    argv = _up_argv(tmp_path, "-f", str(model))
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown GPU 'H900'" in done.stderr
