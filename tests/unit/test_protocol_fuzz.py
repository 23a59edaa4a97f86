"""Random bodies against the simulator's HTTP app: never a 5xx, never an unhandled exception.

A control plane forwards whatever clients send; an engine that crashes or answers 500 on a bad
body would be ejected from the pool. The app runs in-process behind httpx's ASGI transport (which
re-raises anything the app does not handle), with its engine running on the same event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.sim.protocol import ModelContext, OpenAIError, parse_chat, parse_completion
from shoal.sim.serve import add_sim_arguments, build_engine
from shoal.sim.server import ServerSettings, create_app

ENDPOINTS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
small_ints = st.integers(min_value=-3, max_value=6)


def _field(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(values, json_values)


message = st.fixed_dictionaries(
    {},
    optional={
        "role": _field(st.sampled_from(["system", "user", "assistant", "tool"])),
        "content": _field(st.text(max_size=40)),
    },
)
# Bodies shaped like real requests with arbitrary values in the fields vLLM reads.
request_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": _field(st.sampled_from(["tiny", "nope", "tiny-lora"])),
        "prompt": _field(st.text(max_size=60) | st.lists(st.integers(-5, 2000), max_size=8)),
        "messages": _field(st.lists(message, max_size=3)),
        "max_tokens": _field(small_ints),
        "max_completion_tokens": _field(small_ints),
        "min_tokens": _field(small_ints),
        "n": _field(st.integers(min_value=-1, max_value=3)),
        "temperature": _field(st.floats(-1, 3)),
        "top_p": _field(st.floats(-1, 2)),
        "stream": _field(st.booleans()),
        "stream_options": _field(
            st.fixed_dictionaries(
                {},
                optional={
                    "include_usage": _field(st.booleans()),
                    "continuous_usage_stats": _field(st.booleans()),
                },
            )
        ),
        "stop": _field(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3)),
        "logprobs": _field(st.integers(-1, 25) | st.booleans()),
        "top_logprobs": _field(small_ints),
        "ignore_eos": _field(st.booleans()),
        "seed": _field(st.integers()),
        "return_token_ids": _field(st.booleans()),
        "tokens": _field(st.lists(st.integers(-5, 2000), max_size=8)),
        "lora_name": _field(st.text(max_size=10)),
        "lora_path": _field(st.sampled_from(["/nonexistent/x", "", "/models/a"])),
        "add_generation_prompt": _field(st.booleans()),
        "echo": _field(st.booleans()),
    },
)
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "text/plain",
        "application/json; charset=utf-8",
        "application/x+json",
    ]
)


def _sim_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser.parse_args(
        [
            "--model",
            "tiny",
            "--served-model-name",
            "tiny",
            "--block-size",
            "32",
            "--max-model-len",
            "2048",
            "--num-gpu-blocks-override",
            "160",
            "--enable-lora",
            "--max-loras",
            "2",
            # Fast: the fuzzer is about parsing, not timing.
            "--time-scale",
            "100000",
        ]
    )


class _Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        engine, _ = build_engine(_sim_args())
        self.engine = engine
        settings_ = ServerSettings(
            model_path="tiny", dev_mode=True, max_body_bytes=64 * 1024, router_compat=True
        )
        self.app = create_app(engine, None, None, settings_)
        self.loop.run_until_complete(engine.start())
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://sim", timeout=30
        )

    def request(self, method: str, path: str, body: bytes, ctype: str | None) -> httpx.Response:
        headers = {"content-type": ctype} if ctype is not None else {}

        async def go() -> httpx.Response:
            return await self.client.request(method, path, content=body, headers=headers)

        return self.loop.run_until_complete(asyncio.wait_for(go(), 30))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[_Harness]:
    h = _Harness()
    yield h
    h.close()


def _assert_sane(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text[:500]
    if resp.status_code >= 400:
        body = resp.json()
        assert ("error" in body and set(body["error"]) == {"message", "type", "param", "code"}) or (
            "detail" in body
        ), body
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert resp.text.endswith("data: [DONE]\n\n")


_FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=request_bodies, ctype=content_types)
def test_request_shaped_bodies(
    harness: _Harness, path: str, body: dict[str, Any], ctype: str | None
) -> None:
    raw = json.dumps(body).encode()  # NaN/Infinity included: Python's json accepts them
    _assert_sane(harness.request("POST", path, raw, ctype))


@_FUZZ
@given(path=st.sampled_from(ENDPOINTS), value=json_values)
def test_any_json(harness: _Harness, path: str, value: Any) -> None:
    _assert_sane(harness.request("POST", path, json.dumps(value).encode(), "application/json"))


@_FUZZ
@given(
    path=st.sampled_from([*ENDPOINTS, "/admin/faults", "/admin/gpu", "/nope", "/health"]),
    raw=st.binary(max_size=200),
    ctype=content_types,
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
)
def test_any_bytes(
    harness: _Harness, path: str, raw: bytes, ctype: str | None, method: str
) -> None:
    if path == "/admin/faults":
        raw = raw.replace(b"crash", b"crush")  # the one fault that must kill the process
    _assert_sane(harness.request(method, path, raw, ctype))


def test_deep_nesting_and_huge_body(harness: _Harness) -> None:
    deep = b"[" * 100000 + b"]" * 100000
    _assert_sane(harness.request("POST", "/v1/completions", deep, "application/json"))
    big = b'{"prompt": "' + b"w1 " * 40000 + b'"}'
    resp = harness.request("POST", "/v1/completions", big, "application/json")
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == 413


def test_still_healthy_after_fuzzing(harness: _Harness) -> None:
    assert harness.request("GET", "/health", b"", None).status_code == 200
    ok = harness.request(
        "POST",
        "/v1/completions",
        b'{"model":"tiny","prompt":"hello","max_tokens":3,"ignore_eos":true}',
        "application/json",
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


@settings(max_examples=500, deadline=None)
@given(value=json_values | request_bodies)
def test_parsers_raise_only_openai_errors(value: Any) -> None:
    from shoal.sim.tokenizer import SimTokenizer

    ctx = ModelContext("tiny", SimTokenizer(1280), 2048, loras=("tiny-lora",))
    raw = json.dumps(value).encode()
    for parse in (parse_completion, parse_chat):
        try:
            parse(raw, "application/json", ctx)
        except OpenAIError as exc:
            assert 400 <= exc.status < 500
