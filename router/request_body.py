"""The request body of a completion or chat request: parsed once, and what routing needs.

The gateway parses an OpenAI body exactly once (:func:`parse_body`) and keeps what routing
reads: the model, streaming, the output budget, the user, and the prompt, which it tokenizes
(:func:`tokenize_prompt`) only when the routing pipeline reads tokens. The prompt is rendered
and tokenized the way the engines do (:class:`PromptTokenizer`): the simulator's tokenizer for
``shoal sim`` engines, a Hugging Face tokenizer for real vLLM ones (router/hf_tokenizer.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from shoal.router.errors import bad_request
from shoal.sim.catalog import get_model
from shoal.sim.tokenizer import SimTokenizer

log = logging.getLogger(__name__)

# Routing needs the prompt's prefix, not all of it: cap the work a huge prompt costs the loop.
MAX_TOKENIZED_CHARS = 256 * 1024
MAX_ROUTING_BLOCKS = 1024


class PromptTokenizer(Protocol):
    """What routing needs from a tokenizer: the engine's chat template and token ids.

    ``shoal sim`` engines use :class:`SimTokenizer`; an adapter around an HF ``tokenizers``
    tokenizer (with the model's chat template) plugs in the same way for real vLLM engines.
    """

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str: ...


class TokenizerProvider(Protocol):
    """The tokenizer of a model (by the engine's model root, e.g. its Hugging Face name)."""

    def for_model(self, model: str) -> PromptTokenizer: ...


class SimPromptTokenizer:
    def __init__(self, vocab_size: int = 128256) -> None:
        self._tok = SimTokenizer(vocab_size)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        # ``shoal sim`` adds no special tokens to prompts whatever the request says (like the
        # golden model's tokenizer, ``add_bos_token: false``), so neither does the router.
        return self._tok.encode(text)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self._tok.apply_chat_template(messages, add_generation_prompt=True)


class SimTokenizers:
    """Tokenizers matching ``shoal sim`` engines: the simulator's word-level tokenizer hashes
    words into the model's vocabulary, so the vocabulary size (from the simulator's catalog)
    must match the engine's for token ids, hence block hashes, to agree. One per vocabulary size
    (a handful), cached."""

    def __init__(self, default_vocab_size: int = 128256) -> None:
        self._default = default_vocab_size
        self._by_vocab: dict[int, SimPromptTokenizer] = {}
        self._vocab_by_model: dict[str, int] = {}

    def for_model(self, model: str) -> PromptTokenizer:
        vocab = self._vocab_by_model.get(model)
        if vocab is None:
            try:
                vocab = get_model(model).vocab_size
            except KeyError:
                vocab = self._default
            if len(self._vocab_by_model) < 4096:
                self._vocab_by_model[model] = vocab
        tok = self._by_vocab.get(vocab)
        if tok is None:
            tok = self._by_vocab[vocab] = SimPromptTokenizer(vocab)
        return tok


# Prompt length from its characters when it is not tokenized: about 4 characters per token, the
# usual rule of thumb for English text with BPE tokenizers (OpenAI's tokenizer guide).
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class ParsedBody:
    model: str
    stream: bool
    max_tokens: int | None
    user: str | None
    prompt_token_ids: list[int]
    # Exact once tokenized (beyond MAX_TOKENIZED_CHARS extrapolated); until then estimated from
    # the prompt's characters (CHARS_PER_TOKEN).
    prompt_tokens: int
    # The model's tokenizer, which rendered a chat prompt and tokenize_prompt encodes with.
    tokenizer: PromptTokenizer
    # A text prompt (chat: rendered with the model's template) not yet tokenized; None once
    # tokenized, or when the prompt came as token ids.
    prompt_text: str | None = None
    add_special_tokens: bool = False


def tokenize_prompt(parsed: ParsedBody) -> None:
    """Fill in the prompt's token ids and exact length (no-op when there is no text left)."""
    text = parsed.prompt_text
    if text is None:
        return
    head = text[:MAX_TOKENIZED_CHARS]
    ids = parsed.tokenizer.encode(head, add_special_tokens=parsed.add_special_tokens)
    prompt_tokens = len(ids)
    if len(text) > len(head):
        # Roughly as many tokens per character as the part we did tokenize.
        prompt_tokens += int((len(text) - len(head)) * len(ids) / max(1, len(head)))
    parsed.prompt_token_ids = ids
    parsed.prompt_tokens = prompt_tokens
    parsed.prompt_text = None


def parse_body(
    raw: bytes,
    kind: str,
    tokenizer_for: Callable[[str], PromptTokenizer],
    default_model: Callable[[], str] | None = None,
    *,
    tokenize: bool = True,
) -> ParsedBody:
    """Parse an OpenAI completions/chat body once and extract what routing needs.

    Only what routing relies on is validated here; the engine validates the rest and its 400s
    pass through unchanged. A body without ``model`` (or with ``null``) gets ``default_model()``,
    as vLLM serves its default model then; that callable raises ``ApiError`` when the router has
    no single model to choose. With ``tokenize=False`` a text prompt is left for
    :func:`tokenize_prompt` and its length estimated, for routing that reads no prompt tokens.
    """
    try:
        # orjson: ~3x faster than the standard library here, and it rejects NaN/Infinity,
        # which no OpenAI client sends.
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        if default_model is None:
            raise bad_request("'model' is required", "model")
        model = default_model()
    elif not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    stream = body.get("stream") is True
    max_tokens: int | None = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            max_tokens = value
            break
    user = body.get("user")
    tokenizer = tokenizer_for(model)
    text: str | None = None
    ids: list[int] = []
    # vLLM's defaults: special tokens for completions; none for chat, whose template writes them.
    special = body.get("add_special_tokens")
    add_special_tokens = special if isinstance(special, bool) else kind != "chat"
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise bad_request("'messages' must be a list of message objects", "messages")
        try:
            text = tokenizer.chat_prompt(messages)
        except (ValueError, TypeError) as exc:
            # The engine renders the same template and answers this request with its own 400.
            log.debug("chat template failed for %s: %s", model, exc)
            text = None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list):
            ids = [t for t in prompt[: MAX_ROUTING_BLOCKS * 64] if isinstance(t, int)]
        elif prompt is not None:
            raise bad_request("'prompt' must be a string, a list of strings or token ids", "prompt")
    parsed = ParsedBody(
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        user=user if isinstance(user, str) else None,
        prompt_token_ids=ids,
        prompt_tokens=len(ids),
        prompt_text=text,
        add_special_tokens=add_special_tokens,
        tokenizer=tokenizer,
    )
    if text is not None:
        if tokenize:
            tokenize_prompt(parsed)
        else:
            parsed.prompt_tokens = max(1, round(len(text) / CHARS_PER_TOKEN))
    return parsed
