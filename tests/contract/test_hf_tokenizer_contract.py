"""The router's Hugging Face tokenizer path against a real vLLM 0.32.0 server's recordings.

The golden model directory holds the tokenizer the recorded server used. Through the router's own
body parser (``parse_body``), every recorded text prompt and chat conversation must give the token
ids vLLM gave: its ``/tokenize`` answers, its ``usage.prompt_tokens``, and the token ids of the
blocks it announced in its KV events (what the precise ``kv-aware`` index matches against).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from golden import Exchange, golden_root, load

from shoal.kv_events import BlockStored, decode_payload
from shoal.router.hf_tokenizer import HfPromptTokenizer, HfTokenizers
from shoal.router.request_body import SimTokenizers, parse_body

ROOT = golden_root()
pytestmark = pytest.mark.skipif(
    not (ROOT / "model" / "tokenizer.json").exists(), reason="golden model tokenizer not present"
)


@pytest.fixture(scope="module")
def tokenizer() -> HfPromptTokenizer:
    return HfPromptTokenizer.from_dir(ROOT / "model")


def _kind(ex: Exchange) -> str | None:
    if ex.path == "/v1/chat/completions":
        return "chat"
    if ex.path == "/v1/completions":
        return "completions"
    return None


def _text_requests() -> list[Exchange]:
    """Successful completions/chat requests whose prompt is text (not token ids)."""
    out = []
    for variant in ("main", "details"):
        for ex in load(variant):
            body = ex.request_json()
            if _kind(ex) is None or ex.status != 200 or not isinstance(body, dict):
                continue
            if not body.get("model"):  # vLLM's default model; the router needs a name
                continue
            if _kind(ex) == "completions" and not isinstance(body.get("prompt"), str):
                continue
            out.append(ex)
    return out


def _ids(ex: Exchange, tokenizer: HfPromptTokenizer) -> list[int]:
    kind = _kind(ex)
    assert kind is not None and ex.request_body is not None
    return parse_body(ex.request_body, kind, lambda model: tokenizer).prompt_token_ids


def test_tokenize_endpoint_answers(tokenizer: HfPromptTokenizer) -> None:
    by_name = {ex.name: ex for ex in load("main")}
    prompt = by_name["tokenize_prompt"]
    assert (
        tokenizer.encode(prompt.request_json()["prompt"], add_special_tokens=True)
        == (prompt.body_json["tokens"])
    )
    plain = by_name["tokenize_prompt_no_special"]
    assert (
        tokenizer.encode(plain.request_json()["prompt"], add_special_tokens=False)
        == (plain.body_json["tokens"])
    )
    chat = by_name["tokenize_messages"]
    text = tokenizer.chat_prompt(chat.request_json()["messages"])
    assert tokenizer.encode(text, add_special_tokens=False) == chat.body_json["tokens"]


@pytest.mark.parametrize("ex", _text_requests(), ids=lambda ex: ex.id)
def test_prompt_token_counts_match_usage(ex: Exchange, tokenizer: HfPromptTokenizer) -> None:
    usage: Any = ex.body_json.get("usage") if isinstance(ex.body_json, dict) else None
    if not usage:  # streams without usage: nothing recorded to compare
        pytest.skip("no usage recorded")
    assert len(_ids(ex, tokenizer)) == usage["prompt_tokens"]


def test_kv_event_blocks_are_the_prompts_token_ids(tokenizer: HfPromptTokenizer) -> None:
    """A request's first stored block run (no parent) starts with its prompt's token ids (a
    short prompt's block is completed by generated tokens)."""
    by_step = {f"{ex.number:03d}_{ex.name}": ex for ex in _text_requests()}
    checked = 0
    for variant in ("main", "details"):
        path = ROOT / variant / "kv_events_decoded.json"
        if not path.exists():
            continue
        for message in json.loads(path.read_text()):
            ex = by_step.get(message.get("during_step", ""))
            if ex is None or ex.variant != variant:
                continue
            batch = decode_payload(bytes.fromhex(message["payload_hex"]))
            for event in batch.events:
                if isinstance(event, BlockStored) and event.parent_block_hash is None:
                    ids = _ids(ex, tokenizer)
                    n = min(len(ids), len(event.token_ids))
                    assert n > 0 and ids[:n] == event.token_ids[:n], ex.id
                    checked += 1
    assert checked >= 3, "the recordings should hold several first blocks of text prompts"


def test_provider_maps_roots_and_counts_models_without_a_tokenizer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing: list[str] = []
    provider = HfTokenizers(
        {"/models/tiny-llama": str(ROOT / "model")},
        fallback=SimTokenizers(),
        on_fallback=missing.append,
        is_served=lambda root: root != "made-up",
    )
    assert isinstance(provider.for_model("/models/tiny-llama"), HfPromptTokenizer)
    # A root that is itself a tokenizer directory needs no mapping.
    assert isinstance(provider.for_model(str(ROOT / "model")), HfPromptTokenizer)
    provider.for_model("meta-llama/Llama-3.1-8B-Instruct")
    provider.for_model("meta-llama/Llama-3.1-8B-Instruct")
    assert missing == ["meta-llama/Llama-3.1-8B-Instruct"] * 2  # counted per request
    assert caplog.text.count("no Hugging Face tokenizer") == 1  # logged once
    provider.for_model("made-up")  # nobody serves it: its 404 follows, nothing recorded
    assert len(missing) == 2
