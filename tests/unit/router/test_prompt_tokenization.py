"""The router tokenizes a prompt only when its routing reads the tokens (``tokenize_prompts:
auto``), or always when configured to; run in-process over two stub engines
(``inprocess_router``)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import pytest
from inprocess_router import InProcessRouter
from prometheus_client.parser import text_string_to_metric_families

from shoal.router.kv_index import KvEventIndex
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.request_body import (
    CHARS_PER_TOKEN,
    PromptTokenizer,
    SimTokenizers,
    parse_body,
    tokenize_prompt,
)
from shoal.router.scorers import SessionTable
from shoal.router.strategies import STRATEGIES, build_pipeline

# 40 words: 2 full blocks of 16 tokens with the simulator's word-level tokenizer.
PROMPT = " ".join(f"w{i}" for i in range(40))


class CountingTokenizers:
    """The simulator's tokenizers, counting the prompts they encode."""

    def __init__(self) -> None:
        self._inner = SimTokenizers()
        self.encoded = 0

    def for_model(self, model: str) -> PromptTokenizer:
        return _Counting(self._inner.for_model(model), self)


class _Counting:
    def __init__(self, inner: PromptTokenizer, counts: CountingTokenizers) -> None:
        self._inner = inner
        self._counts = counts

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        self._counts.encoded += 1
        return self._inner.encode(text, add_special_tokens=add_special_tokens)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self._inner.chat_prompt(messages)


class Router(InProcessRouter):
    """The in-process router over two stub engines, counting the prompts it tokenizes."""

    def __init__(self, strategy: str, tokenize_prompts: str) -> None:
        self.tokenizers = CountingTokenizers()
        config = {
            "endpoints": [{"url": "http://engine-a"}, {"url": "http://engine-b"}],
            "kv_events": "off",
            "strategy": strategy,
            "tokenize_prompts": tokenize_prompts,
        }
        super().__init__(config, tokenizers=self.tokenizers)

    def complete(self, prompt: str, strategy: str | None = None) -> httpx.Response:
        headers = {"x-shoal-strategy": strategy} if strategy else {}
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}).encode()
        return self.post("/v1/completions", body, headers)

    def prefix_blocks(self, strategy: str, kind: str = "prompt") -> float:
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "shoal_router_prefix_blocks_total" and sample.labels == {
                    "strategy": strategy,
                    "kind": kind,
                }:
                    return sample.value
        return 0.0


@pytest.fixture
def router(request: pytest.FixtureRequest) -> Iterator[Router]:
    strategy, tokenize_prompts = request.param
    r = Router(strategy, tokenize_prompts)
    yield r
    r.close()


@pytest.mark.parametrize("router", [("round-robin", "auto")], indirect=True)
def test_round_robin_routes_without_tokenizing_and_a_prefix_override_tokenizes(
    router: Router,
) -> None:
    for _ in range(3):
        assert router.complete(PROMPT).status_code == 200
    assert router.tokenizers.encoded == 0
    assert router.prefix_blocks("round-robin") == 0  # no estimate without the prompt's blocks
    # A request that asks for prefix routing reads its blocks: it is tokenized and estimated.
    assert router.complete(PROMPT, strategy="prefix").status_code == 200
    assert router.tokenizers.encoded == 1
    assert router.prefix_blocks("prefix") == 2


@pytest.mark.parametrize("router", [("round-robin", "always")], indirect=True)
def test_tokenize_prompts_always_keeps_every_decision_in_the_prefix_history(
    router: Router,
) -> None:
    for _ in range(3):
        assert router.complete(PROMPT).status_code == 200
    assert router.tokenizers.encoded == 3
    assert router.prefix_blocks("round-robin") == 6
    # The history holds round-robin's decisions: each endpoint it chose has the prompt's blocks.
    index = router.app.state.router.approx_index
    assert len(index) > 0
    assert router.complete(PROMPT, strategy="prefix").status_code == 200
    assert router.prefix_blocks("prefix") == 2
    # Both blocks were estimated held where the prefix request went.
    assert router.prefix_blocks("prefix", kind="matched") == 2


@pytest.mark.parametrize("router", [("prefix", "auto")], indirect=True)
def test_prefix_strategy_tokenizes_every_prompt(router: Router) -> None:
    for _ in range(2):
        assert router.complete(PROMPT).status_code == 200
    assert router.tokenizers.encoded == 2
    assert router.prefix_blocks("prefix") == 4


def test_pipelines_read_prompt_tokens_exactly_when_a_scorer_does() -> None:
    deps: dict[str, Any] = {
        "approx_index": ApproxPrefixIndex(100, 60.0),
        "kv_index": KvEventIndex(100),
        "sessions": SessionTable(100),
    }
    reads = {name: build_pipeline(name, **deps).reads_prompt_tokens for name in STRATEGIES}
    assert reads == {
        "random": False,
        "round-robin": False,
        "least-request": False,
        "least-kv": False,
        "power-of-two": False,
        "prefix": True,
        "kv-aware": True,
        "session": False,
    }
    # A weight override that adds in-flight-tokens makes a pipeline read token counts; one that
    # removes the prefix scorer makes it stop.
    added = build_pipeline("least-request", weights={"in-flight-tokens": 1.0}, **deps)
    assert added.reads_prompt_tokens
    removed = build_pipeline("prefix", weights={"approx-prefix": 0.0}, **deps)
    assert not removed.reads_prompt_tokens


def test_an_untokenized_prompt_has_an_estimated_length_and_tokenizing_makes_it_exact() -> None:
    tokenizers = SimTokenizers()
    raw = b'{"model": "tiny", "prompt": "' + PROMPT.encode() + b'"}'
    parsed = parse_body(raw, "completions", tokenizers.for_model, tokenize=False)
    assert parsed.prompt_token_ids == []
    assert parsed.prompt_tokens == round(len(PROMPT) / CHARS_PER_TOKEN)
    tokenize_prompt(parsed)
    assert parsed.prompt_tokens == 40
    assert (
        parsed.prompt_token_ids
        == parse_body(raw, "completions", tokenizers.for_model).prompt_token_ids
    )
    # Token-id prompts need no tokenizer: their length is exact either way.
    ids = parse_body(b'{"model": "tiny", "prompt": [5, 6, 7]}', "completions",
                     tokenizers.for_model, tokenize=False)  # fmt: skip
    assert (ids.prompt_token_ids, ids.prompt_tokens) == ([5, 6, 7], 3)
