"""API keys from a key file, rotated while the router runs (as a mounted Secret is)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from shoal.router.metrics import sample_value


def _status(router: Any, key: str) -> int:
    return httpx.post(
        router.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ).status_code


def _swap(path: Path, text: str) -> None:
    """Replace the file in one rename, as the kubelet swaps a Secret volume's files."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_keys_rotate_without_a_restart_and_a_broken_file_changes_nothing(
    spawn: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-old: {tenant: team-a}\n")
    engine = spawn.sim()
    router = spawn.router(
        [engine.url], config={"api_keys_file": str(keys), "api_keys_reload_s": 0.1}
    )
    assert _status(router, "sk-old") == 200
    assert _status(router, "sk-new") == 401
    _swap(keys, "sk-new: {tenant: team-a}\n")
    deadline = time.monotonic() + 10
    while _status(router, "sk-new") != 200:
        assert time.monotonic() < deadline, router.tail()
        time.sleep(0.1)
    assert _status(router, "sk-old") == 401
    _swap(keys, "sk-new: {tenant: [not, a, name]}\n")  # a bad edit
    deadline = time.monotonic() + 10
    while not sample_value(router.metrics(), "shoal_router_api_keys_reload_errors_total"):
        assert time.monotonic() < deadline, router.tail()
        time.sleep(0.1)
    assert _status(router, "sk-new") == 200  # the keys in force stay
    assert sample_value(router.metrics(), "shoal_router_api_keys") == 1
    assert "API keys not reloaded" in router.tail()


def test_a_bad_key_file_stops_the_router_at_start_with_the_reason(
    spawn: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("sk-a: {tenant: t, priority: urgent}\n")
    router = spawn.router(["http://127.0.0.1:9"], config={"api_keys_file": str(keys)}, wait=False)
    deadline = time.monotonic() + 20
    while router.proc.poll() is None:
        assert time.monotonic() < deadline, router.tail()
        time.sleep(0.1)
    assert router.proc.returncode == 2
    assert "priority" in router.tail()
