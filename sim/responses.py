"""Response bodies and SSE events with exactly vLLM 0.32's key order.

Clients and routers parse these with ordinary JSON parsers, so key order matters only to
byte-level comparisons, but those are what the contract tests (and some caching proxies) do. The
orders below are the ones recorded in ``shared/golden/vllm-0.32.0`` (see its README, "Completions
and chat bodies" and "SSE streams").

Streams are hot: one event per engine output per stream, at hundreds of concurrent streams. Each
stream precomputes the constant head of its events (``data: {"id":...,"model":...,"choices":[``)
and the fast path only JSON-encodes the text; everything else is fixed fragments.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.sim.tokenizer import SimTokenizer

SYSTEM_FINGERPRINT = "vllm-0.32.0-4d5ccc5e"
DONE_EVENT = b"data: [DONE]\n\n"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(value: Any) -> str:
    """Compact JSON, as vLLM's responses are."""
    return _dumps(value)


def completion_id() -> str:
    return f"cmpl-{random.getrandbits(64):016x}"


def chat_id() -> str:
    return f"chatcmpl-{random.getrandbits(64):016x}"


def _opt(value: Any) -> str:
    return "null" if value is None else _dumps(value)


def _finish_json(reason: str | None) -> str:
    return "null" if reason is None else dumps(reason)


# --- usage ---


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # None unless --enable-prompt-tokens-details.
    cached_tokens: int | None = None
    created_cache_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def created_cache_tokens(prompt_tokens: int, cached_tokens: int, block_size: int) -> int:
    """Prompt tokens this request newly wrote to the prefix cache (full blocks only)."""
    return max(0, (prompt_tokens // block_size) * block_size - cached_tokens)


def usage_body(usage: Usage, *, chat: bool) -> dict[str, Any]:
    """Usage of a non-streamed response: total before completion, details or null."""
    details: dict[str, Any] | None = None
    if usage.cached_tokens is not None:
        details = {
            "cached_tokens": usage.cached_tokens,
            # vLLM fills this for chat only; completions report null (golden details/001-008).
            "created_cache_tokens": usage.created_cache_tokens if chat else None,
            "multimodal_tokens": None,
        }
    return {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": None,
    }


def usage_stream(usage: Usage, *, final: bool) -> str:
    """Usage inside a stream event: three counts, plus cache details on the final usage chunk."""
    text = (
        f'{{"prompt_tokens":{usage.prompt_tokens},"total_tokens":{usage.total_tokens},'
        f'"completion_tokens":{usage.completion_tokens}'
    )
    if final and usage.cached_tokens is not None:
        created = usage.created_cache_tokens
        text += (
            f',"prompt_tokens_details":{{"cached_tokens":{usage.cached_tokens},'
            f'"created_cache_tokens":{"null" if created is None else created}}}'
        )
    return text + "}"


# --- logprobs (the simulator has no model, so the values are synthetic but well-formed) ---

# Every token of the golden model's dummy weights has about this logprob; any finite value works.
_LOGPROB = -7.1546125411987305


def _alternatives(tid: int, k: int, vocab: int) -> list[int]:
    """Up to ``k`` distinct token ids other than ``tid``, deterministic per token."""
    out: list[int] = []
    span = max(vocab - 4, 1)
    cand = tid
    for _ in range(4 * max(k, 0) + 8):
        if len(out) >= k:
            break
        cand = 4 + (cand - 4 + 7919) % span
        if cand != tid and cand not in out:
            out.append(cand)
    return out


def completion_logprobs(
    tokenizer: SimTokenizer, token_ids: Sequence[int], top: int, text_offset0: int
) -> dict[str, Any]:
    """The legacy completions logprobs object: text_offset, token_logprobs, tokens, top_logprobs."""
    strs = tokenizer.token_strs(token_ids)
    offsets: list[int] = []
    pos = text_offset0
    tops: list[dict[str, float]] = []
    for tid, s in zip(token_ids, strs, strict=True):
        offsets.append(pos)
        # vLLM advances by the raw token string, without the space detokenizing adds.
        pos += len(s)
        # The sampled token plus the next most likely ones, ``top`` entries in all.
        entry = {s: _LOGPROB}
        for alt in _alternatives(tid, top - 1, tokenizer.vocab_size):
            entry.setdefault(tokenizer.token_str(alt), _LOGPROB)
        tops.append(entry)
    return {
        "text_offset": offsets,
        "token_logprobs": [_LOGPROB] * len(strs),
        "tokens": strs,
        "top_logprobs": tops,
    }


def chat_logprobs(tokenizer: SimTokenizer, token_ids: Sequence[int], top: int) -> dict[str, Any]:
    content = []
    for tid in token_ids:
        s = tokenizer.token_str(tid)
        names = [s] + [
            tokenizer.token_str(t) for t in _alternatives(tid, top - 1, tokenizer.vocab_size)
        ]
        alts = [{"token": a, "logprob": _LOGPROB, "bytes": list(a.encode())} for a in names[:top]]
        content.append(
            {"token": s, "logprob": _LOGPROB, "bytes": list(s.encode()), "top_logprobs": alts}
        )
    return {"content": content}


# --- non-streamed bodies ---


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    logprobs: dict[str, Any] | None = None


def completion_body(
    *,
    rid: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: Usage,
    fingerprint: str = SYSTEM_FINGERPRINT,
) -> bytes:
    return dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids,
                    "prompt_logprobs": None,
                    "prompt_token_ids": c.prompt_token_ids,
                    "routed_experts": None,
                }
                for c in choices
            ],
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": usage_body(usage, chat=False),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    ).encode()


def chat_body(
    *,
    rid: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: Usage,
    prompt_token_ids: list[int] | None = None,
    fingerprint: str = SYSTEM_FINGERPRINT,
) -> bytes:
    return dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "message": {
                        "role": "assistant",
                        "content": c.text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "token_ids": c.token_ids,
                    "routed_experts": None,
                }
                for c in choices
            ],
            "service_tier": None,
            "system_fingerprint": fingerprint,
            "usage": usage_body(usage, chat=True),
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_token_ids,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    ).encode()


# --- SSE ---


class StreamFormatter:
    """Builds the ``data: ...\\n\\n`` events of one streamed completion or chat completion."""

    __slots__ = ("_chat", "_fingerprint", "_head", "_token_tail")

    def __init__(
        self,
        *,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        fingerprint: str = SYSTEM_FINGERPRINT,
    ) -> None:
        self._chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":{dumps(rid)},"object":"{obj}","created":{created},'
            f'"model":{dumps(model)},"choices":'
        )
        self._fingerprint = dumps(fingerprint)
        # The constant tail of an ordinary token chunk (fast path).
        if chat:
            self._token_tail = ',"logprobs":null,"finish_reason":null,"token_ids":null}]'
        else:
            self._token_tail = (
                ',"logprobs":null,"finish_reason":null,"stop_reason":null,'
                '"prompt_token_ids":null,"token_ids":null}]'
            )

    def role(self, index: int, prompt_token_ids: list[int] | None = None) -> bytes:
        """Chat's first event per choice: the assistant role with empty content."""
        ptids = "null" if prompt_token_ids is None else dumps(prompt_token_ids)
        return (
            f'{self._head}[{{"index":{index},"delta":{{"role":"assistant","content":""}},'
            f'"logprobs":null,"finish_reason":null}}],"prompt_token_ids":{ptids},'
            f'"prompt_text":null}}\n\n'
        ).encode()

    def token(self, index: int, text: str, usage: Usage | None = None) -> bytes:
        """An ordinary delta: no finish, no logprobs, no token ids (the hot path)."""
        if self._chat:
            body = f'{self._head}[{{"index":{index},"delta":{{"content":{_dumps(text)}}}'
        else:
            body = f'{self._head}[{{"index":{index},"text":{_dumps(text)}'
        body += self._token_tail
        if usage is not None:
            body += ',"usage":' + usage_stream(usage, final=False)
        return (body + "}\n\n").encode()

    def chunk(
        self,
        index: int,
        text: str,
        *,
        finish_reason: str | None = None,
        stop_reason: str | int | None = None,
        token_ids: list[int] | None = None,
        prompt_token_ids: list[int] | None = None,
        logprobs: dict[str, Any] | None = None,
        usage: Usage | None = None,
        last: bool = False,
    ) -> bytes:
        """Any delta, including the one that carries ``finish_reason`` (and ``stop_reason``)."""
        finished = finish_reason is not None
        if self._chat:
            choice = f'{{"index":{index},"delta":{{"content":{_dumps(text)}}}'
            choice += f',"logprobs":{"null" if logprobs is None else dumps(logprobs)}'
            choice += f',"finish_reason":{_finish_json(finish_reason)}'
            if finished:
                choice += f',"stop_reason":{"null" if stop_reason is None else dumps(stop_reason)}'
            choice += f',"token_ids":{"null" if token_ids is None else dumps(token_ids)}}}'
        else:
            choice = f'{{"index":{index},"text":{_dumps(text)}'
            choice += f',"logprobs":{"null" if logprobs is None else dumps(logprobs)}'
            choice += f',"finish_reason":{_finish_json(finish_reason)}'
            choice += f',"stop_reason":{"null" if stop_reason is None else dumps(stop_reason)}'
            choice += (
                f',"prompt_token_ids":{_opt(prompt_token_ids)},"token_ids":{_opt(token_ids)}}}'
            )
        body = f"{self._head}[{choice}]"
        if usage is not None:
            body += ',"usage":' + usage_stream(usage, final=False)
        if last:
            body += ',"system_fingerprint":' + self._fingerprint
        return (body + "}\n\n").encode()

    def usage(self, usage: Usage) -> bytes:
        """The extra event ``include_usage`` adds: no choices, totals, the fingerprint."""
        return (
            f'{self._head}[],"usage":{usage_stream(usage, final=True)},'
            f'"system_fingerprint":{self._fingerprint}}}\n\n'
        ).encode()
