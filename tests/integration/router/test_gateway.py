"""The router's OpenAI surface against real ``shoal sim`` engines."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from router_procs import Router, Sim

from shoal.router.metrics import sample_value


def test_models_lists_every_base_model_and_adapter(router: Router) -> None:
    data = httpx.get(router.url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["tiny"]["parent"] is None
    assert by_id["tiny-lora"]["parent"] == "tiny"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_chat_and_completions(router: Router, stream: bool) -> None:
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello there"}],
                max_tokens=5,
                stream=True,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        comp = list(
            client.completions.create(model="tiny", prompt="a b c", max_tokens=4, stream=True)
        )
        assert "".join(c.choices[0].text for c in comp).strip()
    else:
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens == 5
        comp = client.completions.create(model="tiny", prompt="a b c", max_tokens=3)
        assert comp.choices[0].text


def test_raw_stream_is_passed_through_with_endpoint_header(
    router: Router, engines: list[Sim]
) -> None:
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-shoal-endpoint"] in {e.url for e in engines}
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 6 + 1
    assert "content-length" not in resp.headers  # a stream is chunked as it comes


def test_a_non_streamed_body_keeps_the_engines_length(router: Router) -> None:
    """Passed through with its content-length, not re-chunked (one socket write fewer)."""
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 6}
    resp = httpx.post(router.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-length"] == str(len(resp.content))
    assert "transfer-encoding" not in resp.headers
    assert resp.json()["usage"]["completion_tokens"] == 6


def test_adapter_requests_go_to_the_engine_that_has_it(router: Router, engines: list[Sim]) -> None:
    for _ in range(4):
        resp = httpx.post(
            router.url + "/v1/completions",
            json={"model": "tiny-lora", "prompt": "x y", "max_tokens": 2},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-shoal-endpoint"] == engines[2].url


def _error(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


def test_client_errors_are_openai_shaped(router: Router) -> None:
    url = router.url + "/v1/completions"
    _error(httpx.post(url, content=b"{not json", timeout=10), 400)
    _error(httpx.post(url, content=b"[1, 2]", timeout=10), 400)
    err = _error(httpx.post(url, json={"model": "nope", "prompt": "x"}, timeout=10), 404)
    assert err["code"] == "model_not_found"
    err = _error(
        httpx.post(
            url,
            json={"model": "tiny", "prompt": "x"},
            headers={"x-shoal-strategy": "fastest"},
            timeout=10,
        ),
        400,
    )
    assert err["param"] == "x-shoal-strategy"
    # The engine's own validation errors pass through untouched.
    resp = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": -1}, timeout=10)
    assert resp.status_code == 400


def test_a_body_without_model_is_served_by_the_only_model_as_vllm_does(router: Router) -> None:
    """vLLM answers a model-less request with its default model (golden
    ``056_missing_model_completions``); through the router it does the same."""
    body = {"prompt": "hello world tell me a short story about the cat", "max_tokens": 4}
    resp = httpx.post(router.url + "/v1/completions", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "tiny"
    assert resp.json()["usage"]["prompt_tokens"] == 10
    assert resp.headers["x-shoal-endpoint"]


def test_body_limit_413(spawn: object, engines: list[Sim]) -> None:
    r = spawn.router([engines[0].url], "--max-body-bytes", "1024")  # type: ignore[attr-defined]
    resp = httpx.post(
        r.url + "/v1/completions", json={"model": "tiny", "prompt": "w " * 2000}, timeout=10
    )
    _error(resp, 413)


def test_no_endpoints_503_with_retry_after(spawn: object) -> None:
    r = spawn.router([])  # type: ignore[attr-defined]
    resp = httpx.post(r.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=10)
    _error(resp, 503)
    assert int(resp.headers["retry-after"]) >= 1


def test_metrics_count_requests(router: Router) -> None:
    httpx.post(
        router.url + "/v1/completions", json={"model": "tiny", "prompt": "m", "max_tokens": 1}
    )
    text = router.metrics()
    assert "shoal_router_requests_total" in text
    assert sample_value(text, "shoal_router_e2e_latency_seconds_count", {"model": "tiny"})
    assert "shoal_router_decisions_total" in text
    assert sample_value(text, "shoal_router_endpoint_stale", {}) == 0.0


def _engine_busy(sim: Sim) -> int:
    stats = httpx.get(sim.url + "/admin/state", timeout=5).json()["engine"]
    return int(stats["num_running"] + stats["num_waiting"])


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_through_the_router_aborts_the_engine_request(
    spawn: object, stream: bool
) -> None:
    sim = spawn.sim()  # type: ignore[attr-defined]
    router = spawn.router([sim.url])  # type: ignore[attr-defined]
    sim.faults(slowdown=100.0)  # a generation that would run for minutes
    body = {"model": "tiny", "prompt": "a b c", "max_tokens": 1500, "min_tokens": 1500,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    with httpx.Client(base_url=router.url, timeout=httpx.Timeout(30, read=1.0)) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                # Hold the iterator: closing it (as dropping a bare next(iter_bytes()) does)
                # closes the connection, and the engine could abort before the check below.
                body_chunks = resp.iter_bytes()
                next(body_chunks)
                assert _engine_busy(sim) == 1
            # Leaving the block closes the response mid-stream: the client disconnects here.
        else:
            # Non-streamed: nothing comes back until the end, so the router is still waiting
            # for the engine's response headers when the client gives up.
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.post, "/v1/completions", json=body)
                busy_deadline = time.monotonic() + 5
                while not _engine_busy(sim) and time.monotonic() < busy_deadline:
                    time.sleep(0.02)
                assert _engine_busy(sim) == 1
                with pytest.raises(httpx.ReadTimeout):
                    pending.result()
    # The client is gone: the router closes its upstream connection and the engine aborts.
    deadline = time.monotonic() + 5
    while _engine_busy(sim) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_busy(sim) == 0
    # The router counted it as a client disconnect and keeps serving.
    text = router.metrics()
    assert (
        sample_value(
            text,
            "shoal_router_requests_total",
            {"model": "tiny", "endpoint": sim.url, "status": "499"},
        )
        == 1
    )
    sim.faults(slowdown=1.0)
    ok = httpx.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "hi",
                    "max_tokens": 2}, timeout=30)  # fmt: skip
    assert ok.status_code == 200
