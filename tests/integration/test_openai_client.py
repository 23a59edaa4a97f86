"""The official ``openai`` client against a real ``shoal sim`` process.

Whatever the contract tests check byte by byte, this checks from the other side: the client
library control planes and users actually call parses every response, streamed or not, and the
usage it reports adds up.
"""

from __future__ import annotations

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
from openai import NotFoundError, OpenAI

PROMPT = "hello world tell me a short story about the cat"  # 10 tokens
MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Hello there, tell me a story"},
]  # 19 tokens with the chat template
EXACT = {"ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    tmp: Path = tmp_path_factory.mktemp("sim")
    log = tmp / "sim.log"
    argv = [
        sys.executable,
        "-m",
        "shoal",
        "sim",
        "--model",
        "tiny",
        "--served-model-name",
        "tiny",
        "--block-size",
        "32",
        "--max-model-len",
        "2048",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # cwd outside the checkout, where ``shoal`` would resolve to the unmapped source folder.
    proc = subprocess.Popen(argv, cwd=tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "shoal sim did not start"
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def client(sim_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=sim_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion(client: OpenAI) -> None:
    resp = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, extra_body={**EXACT, "min_tokens": 8}
    )
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].text.startswith(" ")
    assert len(resp.choices[0].text.split()) == 8
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (10, 8)
    assert resp.usage.total_tokens == 18


def test_completion_stream(client: OpenAI) -> None:
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**EXACT, "min_tokens": 12},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish == "length"
    assert len(text.split()) == 12
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 12, 22)


def test_chat(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_completion_tokens=5,
        extra_body={**EXACT, "min_tokens": 5},
    )
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content and msg.content.startswith(" ")
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (19, 5)


def test_chat_stream_n2(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={**EXACT, "min_tokens": 4},
    )
    texts = ["", ""]
    roles = 0
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.role == "assistant":
                roles += 1
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert roles == 2
    assert finishes == {0: "length", 1: "length"}
    assert [len(t.split()) for t in texts] == [4, 4]
    assert texts[0] != texts[1], "the n choices are sampled with different seeds"
    assert usage is not None
    # The prompt is counted once; completion tokens over both choices.
    assert (usage.prompt_tokens, usage.completion_tokens) == (19, 8)


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert "does not exist" in str(info.value)


def test_clamped_to_context(client: OpenAI) -> None:
    prompt = " ".join(f"w{i}" for i in range(2000))
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=100, extra_body=EXACT)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2000, 48)
    assert resp.choices[0].finish_reason == "length"
