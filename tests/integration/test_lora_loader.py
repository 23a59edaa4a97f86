"""The engine LoRA client against a real ``shoal sim`` (vLLM-compatible adapter endpoints)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.local import HOST, ManagedProcess, free_port, shoal_executable
from shoal.operator.lora_loader import EngineLoraClient, EngineLoraError, RetryPolicy

FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [
        *shoal_executable(), "sim",
        "--model", "tiny", "--served-model-name", "tiny",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    sim = ManagedProcess("sim", argv, log, url=f"http://{HOST}:{port}")
    sim.start()
    try:
        sim.wait_healthy(timeout_s=30)
        yield f"{HOST}:{port}"
    finally:
        sim.stop()


def _run(coro_fn: object) -> object:
    async def go() -> object:
        async with httpx.AsyncClient(timeout=5) as http:
            return await coro_fn(EngineLoraClient(http, FAST))  # type: ignore[operator]

    return asyncio.run(go())


def test_load_verify_list_unload(engine: str, tmp_path: Path) -> None:
    (tmp_path / "sql").mkdir()

    async def scenario(c: EngineLoraClient) -> tuple[set[str], set[str], set[str]]:
        before = await c.loaded(engine)
        await c.load_verified(engine, "sql", str(tmp_path / "sql"))
        await c.load(engine, "sql", str(tmp_path / "sql"))  # again: idempotent
        during = await c.loaded(engine)
        await c.unload(engine, "sql")
        await c.unload(engine, "sql")  # not there any more: still fine
        return before, during, await c.loaded(engine)

    before, during, after = _run(scenario)  # type: ignore[misc]
    assert "sql" not in before
    assert "sql" in during and "tiny" not in during  # the base model is not an adapter
    assert "sql" not in after


def test_engine_refusing_a_path_is_not_retried(engine: str, tmp_path: Path) -> None:
    async def scenario(c: EngineLoraClient) -> EngineLoraError:
        with pytest.raises(EngineLoraError) as err:
            await c.load(engine, "ghost", str(tmp_path / "does-not-exist"))
        return err.value

    err = _run(scenario)
    assert isinstance(err, EngineLoraError)
    assert not err.retryable and err.reason == "LoadRefused"
    assert "HTTP 404" in err.message and "No adapter found" in err.message


def test_unreachable_engine_is_retried_then_reported() -> None:
    dead = f"{HOST}:{free_port()}"

    async def scenario(c: EngineLoraClient) -> EngineLoraError:
        with pytest.raises(EngineLoraError) as err:
            await c.loaded(dead)
        return err.value

    err = _run(scenario)
    assert isinstance(err, EngineLoraError)
    assert err.retryable and err.reason == "EngineUnreachable"
    assert "after 3 attempts" in err.message and "ConnectError" in err.message
