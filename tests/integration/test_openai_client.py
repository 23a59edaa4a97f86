"""The official ``openai`` client against a real ``shoal sim`` process.

Whatever the contract tests check byte by byte, this checks from the other side: the client
library control planes and users actually call parses every response, streamed or not, and the
usage it reports adds up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import NotFoundError, OpenAI

from shoal.local import HOST, ManagedProcess, free_port, shoal_executable

PROMPT = "hello world tell me a short story about the cat"  # 10 tokens
MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Hello there, tell me a story"},
]  # 19 tokens with the chat template
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [
        *shoal_executable(), "sim",
        "--model", "tiny", "--served-model-name", "tiny",
        "--block-size", "32", "--max-model-len", "2048",
        "--host", HOST, "--port", str(port),
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    sim = ManagedProcess("sim", argv, log, url=f"http://{HOST}:{port}")
    sim.start()
    try:
        sim.wait_healthy(timeout_s=30)
        yield sim.url
    finally:
        sim.stop()


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
