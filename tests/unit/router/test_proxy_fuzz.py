"""Hypothesis-generated request bodies and headers never produce a 500 nor break the router.

The router runs in-process with its real lifespan; its engine is a stub ASGI app reached through
the router's own HTTP client (an ``httpx.ASGITransport``), so no process or port is needed.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess_router import InProcessRouter
from starlette.responses import Response

from shoal.router.app import build_components
from shoal.router.config import RouterConfig

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["tiny", "other", ""]) | json_values},
        optional={
            "prompt": json_values,
            "messages": json_values,
            "stream": json_values,
            "max_tokens": json_values,
            "user": json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)
headers = st.dictionaries(
    st.sampled_from(["x-shoal-strategy", "x-shoal-priority", "x-session-id", "x-shoal-tenant"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    max_size=3,
)


HARNESS: dict[str, Any] = {}


def _harness() -> InProcessRouter:
    if "h" not in HARNESS:
        HARNESS["h"] = InProcessRouter(
            {"endpoints": [{"url": "http://engine"}], "max_body_bytes": 4096, "kv_events": "off"}
        )
    return HARNESS["h"]  # type: ignore[no-any-return]


def teardown_module() -> None:
    if "h" in HARNESS:
        HARNESS.pop("h").close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, hdrs=headers, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_requests_never_500(body: bytes, hdrs: dict[str, str], path: str) -> None:
    h = _harness()
    resp = h.post(path, body, hdrs)
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    # The router is still alive and serving.
    ok = h.post(path.replace("chat/", ""), b'{"model":"tiny","prompt":"hi"}', {})
    assert ok.status_code == 200, ok.text


def test_build_components_is_side_effect_free() -> None:
    a = build_components(RouterConfig())
    b = build_components(RouterConfig())
    assert a.metrics.registry is not b.metrics.registry


def test_a_bug_in_the_gateway_answers_an_openai_shaped_500_and_the_router_keeps_serving() -> None:
    h = _harness()
    gateway = h.app.gateway
    original = gateway._handle

    async def broken(*args: Any, **kwargs: Any) -> Response:
        raise RuntimeError("a bug")

    gateway._handle = broken  # type: ignore[method-assign]
    try:
        resp = h.post("/v1/completions", b'{"model":"tiny","prompt":"hi"}', {})
    finally:
        gateway._handle = original  # type: ignore[method-assign]
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "internal_server_error"
    assert h.post("/v1/completions", b'{"model":"tiny","prompt":"hi"}', {}).status_code == 200
    # Other methods on the proxied paths get an OpenAI-shaped 405 naming the one they take.
    wrong_method = h.get("/v1/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
