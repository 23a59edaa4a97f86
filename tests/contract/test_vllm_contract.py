"""Replay every recorded vLLM 0.32.0 exchange against ``shoal sim`` and compare.

The golden recordings (``shared/golden/vllm-0.32.0``, see its README) are the contract: a control
plane must not be able to tell the simulator from the real server. Each exchange is replayed in
recorded order against one real ``shoal sim`` process per variant (state carries over: a loaded
LoRA, the prefix cache), configured like the recorded server. Compared:

- status code, ``content-type``, the header names and their order (``date`` aside), ``allow``;
- JSON bodies: the key sequence of every object, recursively (values such as ids, timestamps,
  generated text and token ids differ by design); error bodies byte for byte;
- SSE: ``data: ...\\n\\n`` framing, the final ``data: [DONE]``, the key order of the role, token,
  finish and usage chunks, one role and one finish chunk per choice, ``system_fingerprint`` only
  on the last JSON event;
- usage numbers fixed by the prompt: prompt_tokens, completion_tokens of length-limited outputs,
  cached_tokens of the prefix-cache exchanges, the clamped 48 tokens;
- /metrics: metric family names and types.

Deliberate differences are asserted as such, with the reason, in ``_DIFFERENCES``.
"""

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
from typing import Any

import httpx
import pytest
from golden import Exchange, golden_root, load, prom_families, prom_value, sse_events

pytestmark = pytest.mark.slow

# Why the simulator answers some exchanges differently from the recording.
_DIFFERENCES = {
    # The simulator's tokenizer is word-level like the golden one (same counts, same token
    # strings) but has no copy of the golden vocabulary, so token *ids* differ.
    "tokenize_ids": "token ids come from the simulator's vocabulary, not the golden model's",
    # Generated text cannot match a real model's: a stop string the real model happened to
    # produce may never be produced by the simulator, and the other way round.
    "stop_string": "generated tokens differ, so whether a stop string occurs differs",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimProcess:
    """A ``shoal sim`` subprocess on a free port; stopped by PID."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.port = _free_port()
        self.kv_port = _free_port()
        self.replay_port = _free_port()
        kv = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{self.kv_port}",
            "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
            "topic": f"kv@127.0.0.1:{self.port}@tiny",
        }
        argv = [
            sys.executable,
            "-m",
            "shoal",
            "sim",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--kv-events-config",
            json.dumps(kv),
            *args,
        ]
        self.log = cwd / f"sim-{self.port}.log"
        # cwd outside the checkout: there ``shoal`` would resolve to the source folder, which
        # does not contain ``shoal.sim`` (it is mapped in from ``sim/`` by the install).
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal sim exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"shoal sim did not become healthy: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# The recorded server's flags (golden index.json), in the simulator's spelling. The SGLang-router
# probe endpoints are off: real vLLM answers 404 on them (exchanges 008-018), and with
# ``--no-router-compat`` the simulator does too. ``--lora-fake-root /models`` accepts the
# recorded adapter path /models/tiny-lora without the file existing here; /nonexistent/adapter
# still answers 404.
_BASE_ARGS = [
    "--model",
    "tiny",
    "--served-model-name",
    "tiny",
    "--load-format",
    "dummy",
    "--dtype",
    "float32",
    "--block-size",
    "32",
    "--max-model-len",
    "2048",
    "--num-gpu-blocks-override",
    "160",
    "--enable-prefix-caching",
    "--enable-lora",
    "--max-loras",
    "2",
    "--max-lora-rank",
    "8",
    "--lora-fake-root",
    "/models",
    "--no-router-compat",
]
_VARIANT_ARGS = {
    "main": _BASE_ARGS,
    "details": [*_BASE_ARGS, "--enable-prompt-tokens-details", "--dev-mode"],
}

_servers: dict[str, SimProcess] = {}


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SimProcess]]:
    yield _servers
    for server in _servers.values():
        server.stop()
    _servers.clear()


def _server(sims: dict[str, SimProcess], variant: str, tmp: Path) -> SimProcess:
    if variant not in sims:
        sims[variant] = SimProcess(_VARIANT_ARGS[variant], tmp)
    return sims[variant]


# --- comparison helpers ---

# Lists whose length follows the generated tokens; their elements are compared to the golden's
# first element.
_VARIABLE_LISTS = {"content", "top_logprobs", "text_offset", "token_logprobs", "tokens"}
# Objects keyed by data (a token string), not by field name.
_DATA_KEYED = {"top_logprobs"}


def assert_same_shape(ours: Any, golden: Any, path: str = "$") -> None:
    if isinstance(golden, dict):
        assert isinstance(ours, dict), f"{path}: expected an object, got {ours!r}"
        parent = path.rsplit(".", 1)[-1].split("[")[0]
        if parent in _DATA_KEYED:
            return
        assert list(ours) == list(golden), f"{path}: keys {list(ours)} != golden {list(golden)}"
        for key, value in golden.items():
            assert_same_shape(ours[key], value, f"{path}.{key}")
    elif isinstance(golden, list):
        assert isinstance(ours, list), f"{path}: expected a list, got {ours!r}"
        name = path.rsplit(".", 1)[-1]
        if name in _VARIABLE_LISTS:
            if golden:
                for i, item in enumerate(ours):
                    assert_same_shape(item, golden[0], f"{path}[{i}]")
            return
        if any(isinstance(g, (dict, list)) for g in golden):
            assert len(ours) == len(golden), f"{path}: {len(ours)} items != golden {len(golden)}"
            for i, (o, g) in enumerate(zip(ours, golden, strict=True)):
                assert_same_shape(o, g, f"{path}[{i}]")
    elif golden is not None and ours is not None:
        assert type(ours) is type(golden) or {type(ours), type(golden)} <= {int, float}, (
            f"{path}: {type(ours).__name__} != golden {type(golden).__name__}"
        )


def _header_names(headers: list[tuple[str, str]]) -> list[str]:
    return [k.lower() for k, _ in headers if k.lower() != "date"]


def _send(client: httpx.Client, ex: Exchange) -> httpx.Response:
    headers = {}
    ctype = ex.request_header("content-type")
    if ctype is not None:
        headers["content-type"] = ctype
    return client.request(ex.method, ex.path, content=ex.request_body, headers=headers)


def _all_length_limited(body: dict[str, Any]) -> bool:
    return all(c.get("finish_reason") == "length" for c in body.get("choices", []))


def _check_usage(ours: dict[str, Any], golden: dict[str, Any], length_limited: bool) -> None:
    assert ours["prompt_tokens"] == golden["prompt_tokens"], "prompt_tokens"
    assert ours["total_tokens"] == ours["prompt_tokens"] + ours["completion_tokens"]
    if length_limited:
        assert ours["completion_tokens"] == golden["completion_tokens"], "completion_tokens"
    g_details = golden.get("prompt_tokens_details")
    if isinstance(g_details, dict):
        o_details = ours["prompt_tokens_details"]
        assert o_details["cached_tokens"] == g_details["cached_tokens"], "cached_tokens"
        if g_details.get("created_cache_tokens") is not None:
            assert o_details["created_cache_tokens"] == g_details["created_cache_tokens"]


def _check_json_body(ex: Exchange, resp: httpx.Response) -> None:
    golden = ex.body_json
    ours = resp.json()
    if "error" in golden or "detail" in golden:
        # Errors are fully determined by the request: byte for byte.
        assert resp.text == ex.body_raw
        return
    if ex.path in ("/version", "/load"):
        assert resp.text == ex.body_raw
        return
    assert_same_shape(ours, golden)
    if ex.path == "/tokenize":
        assert ours["count"] == golden["count"]
        assert ours["max_model_len"] == golden["max_model_len"]
        assert ours["token_strs"] == golden["token_strs"]
        # Deliberate difference: _DIFFERENCES["tokenize_ids"].
        assert len(ours["tokens"]) == len(golden["tokens"])
    elif ex.path == "/detokenize":
        # Same token strings joined by spaces; which words the ids map to differs
        # (_DIFFERENCES["tokenize_ids"]), the special tokens do not.
        words = ours["prompt"].split(" ")
        assert len(words) == len(golden["prompt"].split(" "))
        assert words[0] == "<s>" and words[-1] == "</s>"
    elif ex.path == "/v1/models":
        assert [c["id"] for c in ours["data"]] == [c["id"] for c in golden["data"]]
        assert [c["parent"] for c in ours["data"]] == [c["parent"] for c in golden["data"]]
        assert [c["max_model_len"] for c in ours["data"]] == [
            c["max_model_len"] for c in golden["data"]
        ]
    elif ex.path == "/kv_event_sources":
        g, o = golden["0"], ours["0"]
        for key in ("enable_kv_cache_events", "publisher", "buffer_steps", "hwm"):
            assert o[key] == g[key], key
    elif ex.path == "/reset_prefix_cache":
        assert ours == golden
    elif "usage" in golden:
        assert ours["model"] == golden["model"]
        assert ours["object"] == golden["object"]
        prefix = "chatcmpl-" if golden["object"] == "chat.completion" else "cmpl-"
        assert ours["id"].startswith(prefix) and len(ours["id"]) == len(golden["id"])
        assert ours["system_fingerprint"] == golden["system_fingerprint"]
        _check_choices(ex, ours, golden)
        _check_usage(ours["usage"], golden["usage"], _all_length_limited(golden))


def _check_choices(ex: Exchange, ours: dict[str, Any], golden: dict[str, Any]) -> None:
    assert [c["index"] for c in ours["choices"]] == [c["index"] for c in golden["choices"]]
    req = ex.request_json() or {}
    for o, g in zip(ours["choices"], golden["choices"], strict=True):
        text = o["text"] if "text" in o else o["message"]["content"]
        assert text.startswith(" "), "generated text starts with a space (no decoder)"
        if g["finish_reason"] == "length":
            assert o["finish_reason"] == "length"
        if req.get("stop"):
            # _DIFFERENCES["stop_string"]: stop if the sim produced it, else length.
            assert o["finish_reason"] in ("stop", "length")
            if o["finish_reason"] == "stop":
                assert o["stop_reason"] in req["stop"]
                assert not any(s in text for s in req["stop"])
        if g.get("prompt_token_ids") is not None:
            assert o["prompt_token_ids"] == g["prompt_token_ids"]
        if g.get("token_ids") is not None:
            assert len(o["token_ids"]) == len(g["token_ids"])


def _classify(event: dict[str, Any]) -> str:
    choices = event["choices"]
    if not choices:
        return "usage"
    choice = choices[0]
    if "delta" in choice and "role" in choice["delta"]:
        return "role"
    if choice.get("finish_reason") is not None:
        return "finish"
    return "token"


def _check_stream(ex: Exchange, resp: httpx.Response) -> None:
    assert ex.sse is not None
    golden_payloads = sse_events(ex.sse)
    ours_payloads = sse_events(resp.text)
    assert golden_payloads[-1] == "[DONE]"
    assert ours_payloads[-1] == "[DONE]", "the stream ends with data: [DONE]"
    golden_events = [json.loads(p) for p in golden_payloads[:-1]]
    ours_events = [json.loads(p) for p in ours_payloads[:-1]]
    # system_fingerprint only on the last JSON event.
    assert [("system_fingerprint" in e) for e in ours_events] == [False] * (
        len(ours_events) - 1
    ) + [True]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in golden_events:
        by_kind.setdefault(_classify(event), []).append(event)
    ours_by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in ours_events:
        ours_by_kind.setdefault(_classify(event), []).append(event)
    for kind, events in by_kind.items():
        assert kind in ours_by_kind, f"no {kind} chunk"
        mine = ours_by_kind[kind]
        if kind == "finish":
            # Compare finish chunks with and without the fingerprint separately.
            for g in events:
                match = [
                    e for e in mine if ("system_fingerprint" in e) == ("system_fingerprint" in g)
                ]
                assert match, "a finish chunk placed like the golden one"
                assert_same_shape(match[0], g, "$finish")
        else:
            assert_same_shape(mine[0], events[0], f"${kind}")
    req = ex.request_json() or {}
    n = int(req.get("n", 1))
    # One role chunk per choice, first; one finish chunk per choice, its last chunk.
    if "role" in by_kind:
        roles = ours_by_kind["role"]
        assert sorted(e["choices"][0]["index"] for e in roles) == list(range(n))
        assert all(_classify(e) == "role" for e in ours_events[:n])
    finishes = ours_by_kind.get("finish", [])
    assert sorted(e["choices"][0]["index"] for e in finishes) == list(range(n))
    for event in finishes:
        index = event["choices"][0]["index"]
        later = [e for e in ours_events[ours_events.index(event) + 1 :] if e["choices"]]
        assert all(e["choices"][0]["index"] != index for e in later), "finish is last"
    # Usage: the extra chunk is the last JSON event; numbers fixed by the prompt match.
    if "usage" in by_kind:
        assert _classify(ours_events[-1]) == "usage"
        length_limited = all(
            e["choices"][0]["finish_reason"] == "length" for e in by_kind["finish"]
        ) and all(e["choices"][0]["finish_reason"] == "length" for e in finishes)
        _check_usage(ours_events[-1]["usage"], by_kind["usage"][0]["usage"], length_limited)
    if req.get("stream_options", {}).get("continuous_usage_stats"):
        for event in ours_events[:-1]:
            assert "usage" in event, "continuous_usage_stats puts usage on every chunk"
    for event in ours_events:
        assert event["model"] == golden_events[0]["model"]
        assert event["id"] == ours_events[0]["id"]


def _check_metrics(ex: Exchange, resp: httpx.Response, sim: SimProcess) -> None:
    assert ex.prom is not None
    golden = prom_families(ex.prom)
    ours = prom_families(resp.text)
    missing = {name: kind for name, kind in golden.items() if name not in ours}
    assert not missing, f"metric families missing: {sorted(missing)}"
    wrong = {n: (ours[n], k) for n, k in golden.items() if ours[n] != k}
    assert not wrong, f"metric family types differ (ours, golden): {wrong}"
    extra = sorted(n for n in ours if n.startswith("vllm:") and n not in golden)
    assert not extra, f"vllm: families vLLM does not have: {extra}"
    labels = {"engine": "0", "model_name": "tiny"}
    if ex.variant == "main" and ex.number >= 45:
        # 192 (200-token prompt, 6 blocks) + 128 (155-token chat, 4 blocks), both block-aligned.
        hits = prom_value(resp.text, "vllm:prefix_cache_hits_total", labels)
        golden_hits = prom_value(ex.prom, "vllm:prefix_cache_hits_total", labels)
        if ex.number == 45:
            assert hits == golden_hits == 320.0
        else:
            assert hits is not None and hits >= 320.0


def _lora_stream_with_metrics_during(client: httpx.Client, ex: Exchange) -> httpx.Response:
    """082: /metrics scraped while the adapter's stream runs shows it running."""
    # The simulated tiny model is fast; slow the engine so the stream is still running.
    client.post("/admin/faults", json={"slowdown": 200.0})
    try:
        with client.stream(
            ex.method,
            ex.path,
            content=ex.request_body,
            headers={"content-type": "application/json"},
        ) as resp:
            chunks = resp.iter_bytes()
            first = next(chunks)
            metrics = client.get("/metrics").text
            running = prom_value(
                metrics, "vllm:num_requests_running", {"engine": "0", "model_name": "tiny"}
            )
            assert running == 1.0
            assert 'running_lora_adapters="tiny-lora"' in metrics
            client.post("/admin/faults", json={"slowdown": 1.0})
            body = first + b"".join(chunks)
        resp._content = body  # the checks below read .text
        return resp
    finally:
        client.post("/admin/faults", json={"slowdown": 1.0})


def _replay(sim: SimProcess, ex: Exchange, sims: dict[str, SimProcess]) -> httpx.Response:
    with httpx.Client(base_url=sim.url, timeout=60) as client:
        if ex.variant == "main" and ex.number == 82:
            return _lora_stream_with_metrics_during(client, ex)
        return _send(client, ex)


def _check_exchange(ex: Exchange, sims: dict[str, SimProcess], tmp: Path) -> None:
    sim = _server(sims, ex.variant, tmp)
    resp = _replay(sim, ex, sims)
    assert resp.status_code == ex.status, resp.text[:500]
    assert resp.headers.get("content-type") == ex.response_header("content-type")
    assert resp.headers.get("server") == "uvicorn"
    assert resp.headers.get("vary") == "Origin"
    assert resp.headers.get("allow") == ex.response_header("allow")
    ours_headers = [(k.decode(), v.decode()) for k, v in resp.headers.raw]
    assert _header_names(ours_headers) == _header_names(ex.response_headers)
    if ex.is_stream:
        _check_stream(ex, resp)
    elif ex.prom is not None:
        _check_metrics(ex, resp, sim)
    elif ex.body_json is not None:
        _check_json_body(ex, resp)
    else:
        # Empty health bodies and the plain-text LoRA answers: byte for byte.
        assert resp.text == ex.body_raw


_MAIN = load("main")
_DETAILS = load("details")


@pytest.mark.parametrize("ex", _MAIN, ids=[e.id for e in _MAIN])
def test_main_exchange(
    ex: Exchange, sims: dict[str, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _check_exchange(ex, sims, tmp_path_factory.mktemp("sim"))


def test_main_kv_events_replay(
    sims: dict[str, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """After the main run, a replay from seq 0 returns every batch in vLLM's wire format."""
    import msgpack
    import zmq

    sim = _server(sims, "main", tmp_path_factory.mktemp("sim"))
    golden_batches = json.loads((golden_root() / "main" / "kv_events_decoded.json").read_text())
    golden_keys: dict[str, list[str]] = {}
    for message in golden_batches:
        for event in message["decoded"][1]:
            golden_keys.setdefault(event["type"], list(event))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        sock.connect(f"tcp://127.0.0.1:{sim.replay_port}")
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs: list[int] = []
        ours_keys: dict[str, list[str]] = {}
        while True:
            frames = sock.recv_multipart()
            assert frames[0] == b""
            if frames[1] == b"":
                assert frames[2] == b"\xff" * 8, "end marker is seq -1"
                break
            topic, seq, payload = frames[1:]
            assert topic == f"kv@127.0.0.1:{sim.port}@tiny".encode()
            seqs.append(int.from_bytes(seq, "big"))
            ts, events, rank = msgpack.unpackb(payload, strict_map_key=False)
            assert isinstance(ts, float) and rank == 0
            for event in events:
                ours_keys.setdefault(event["type"], list(event))
    finally:
        sock.close()
        ctx.term()
    assert seqs == list(range(len(seqs))) and seqs, "sequence numbers from 0 without gaps"
    # The main run stores blocks and (after the eviction fills) evicts them, as recorded.
    assert set(ours_keys) == set(golden_keys) == {"BlockStored", "BlockRemoved"}
    for kind, keys in golden_keys.items():
        assert ours_keys[kind] == keys, kind


@pytest.mark.parametrize("ex", _DETAILS, ids=[e.id for e in _DETAILS])
def test_details_exchange(
    ex: Exchange, sims: dict[str, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    if "main" in sims:
        sims.pop("main").stop()  # a fresh server for the details run, as recorded
    _check_exchange(ex, sims, tmp_path_factory.mktemp("sim"))
