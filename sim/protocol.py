"""Request parsing and validation with vLLM 0.32's status codes, error types and messages.

A control plane reacts to an engine's errors (retries a 5xx, surfaces a 400, rediscovers models
on a 404), so the simulator answers bad requests the way vLLM does, as recorded in
``shared/golden/vllm-0.32.0`` (exchanges 050-071, 075-085):

- request-shape problems are FastAPI/pydantic validation errors, type ``"Bad Request"``, param
  ``body.<loc>`` and a message that prints the error dicts; pydantic itself validates the bodies
  here, so lax coercions (``"3"`` -> 3) and rejections (2.5) are exactly pydantic's;
- semantic problems are ``BadRequestError`` with vLLM's sentences (``max_tokens must be at least
  1, got 0. (parameter=max_tokens, value=0)``);
- an unknown model is a 404 ``NotFoundError`` with param ``model``.

Every parser raises only :class:`OpenAIError`, whatever JSON (or non-JSON) it is given.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.sim.tokenizer import SimTokenizer

# vLLM accepts any int64 seed.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Each choice is an engine request; an unbounded ``n`` would let one request exhaust the server.
# vLLM has no such cap (it would queue them all); the simulator answers 400 instead.
MAX_N = 128
# vLLM's default ``--max-logprobs``.
MAX_LOGPROBS = 20
# Default body limit: far above any prompt that fits a 128k context, well below exhausting memory.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class OpenAIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = status if code is None else code

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()


class FastApiHttpError(Exception):
    """An error FastAPI itself answers as ``{"detail": ...}`` (not OpenAI-shaped)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def body(self) -> bytes:
        return json.dumps({"detail": self.detail}, separators=(",", ":")).encode()


def bad_request(message: str, param: str | None = None, value: Any = None) -> OpenAIError:
    """vLLM's ``VLLMValidationError`` text: ``message (parameter=p, value=v)``."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return OpenAIError(400, text, "BadRequestError", param)


def model_not_found(name: str, valid: Sequence[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{name}` does not exist. Valid aliases: {', '.join(valid)}.",
        "NotFoundError",
        "model",
    )


def body_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"Request body is larger than the server's limit of {limit} bytes.",
        "RequestEntityTooLarge",
        None,
    )


# --- request models (the fields vLLM declares that the simulator reads; others are ignored) ---


_M = TypeVar("_M", bound=BaseModel)


class _Lax(BaseModel):
    # vLLM's OpenAIBaseModel allows (and logs) unknown fields.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lax):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Lax):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    return_token_ids: bool | None = None
    priority: int = 0


class CompletionBody(_SamplingFields):
    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False


class ChatBody(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    add_generation_prompt: bool = True


class TokenizePromptBody(_Lax):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatBody(_Lax):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class DetokenizeBody(_Lax):
    model: str | None = None
    tokens: list[int]


class LoadLoraBody(_Lax):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraBody(_Lax):
    lora_name: str
    lora_int_id: int | None = None


# --- typed requests handed to the server ---


@dataclass(slots=True)
class GenerateRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    kind: Literal["completion", "chat"]
    # Echoed as ``model`` in responses: the served name or the adapter name.
    model: str
    lora_name: str | None
    # One prompt per completion-batch entry (chat has exactly one).
    prompts: list[list[int]]
    # Per prompt, after clamping to the remaining context.
    max_tokens: list[int]
    # Whether the client set a limit (the metrics' request_params_max_tokens observes it).
    max_tokens_param: int | None
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    stop: tuple[str, ...]
    min_tokens: int
    ignore_eos: bool
    seed: int | None
    # Completions: number of top logprobs per token; chat: top_logprobs when logprobs is on.
    logprobs: int | None
    return_token_ids: bool
    echo: bool = False
    priority: int = 0
    prompt_texts: list[str] = field(default_factory=list)


@dataclass(slots=True)
class TokenizeRequest:
    model: str
    tokens: list[int]
    return_token_strs: bool


@dataclass(slots=True)
class DetokenizeRequest:
    model: str
    tokens: list[int]


@dataclass(slots=True)
class LoadLoraRequest:
    lora_name: str
    lora_path: str
    load_inplace: bool


@dataclass(slots=True)
class UnloadLoraRequest:
    lora_name: str


@dataclass(slots=True)
class ModelContext:
    """What validation needs to know about the server: served name, adapters, context length."""

    served_model: str
    tokenizer: SimTokenizer
    max_model_len: int
    loras: Collection[str] = ()
    # Extra names answering for the base model (``--served-model-name a b``).
    aliases: tuple[str, ...] = ()


# --- body decoding: FastAPI's behaviour, then vLLM's content-type dependency ---


def _summarize(value: Any) -> Any:
    """How vLLM prints an error's ``input``: containers by size, scalars as text."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    if isinstance(value, str):
        return value if len(value) <= 100 else value[:100] + "..."
    return str(value)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    count = len(errors)
    lines = [f"{count} validation error{'s' if count != 1 else ''}:"]
    lines.extend(f"  {err}" for err in errors)
    return "\n".join(lines)


def _validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    param = errors[0].get("loc") if errors else None
    return OpenAIError(
        400,
        _validation_message(errors),
        "Bad Request",
        param if isinstance(param, str) else None,
    )


def _pydantic_error(exc: ValidationError) -> OpenAIError:
    errors: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False):
        item: dict[str, Any] = {
            "type": err["type"],
            "loc": ".".join(["body", *(str(part) for part in err["loc"])]),
            "msg": err["msg"],
            "input": _summarize(err.get("input")),
        }
        ctx = err.get("ctx")
        if ctx:
            item["ctx"] = {
                k: v if isinstance(v, (int, float, str)) else str(v) for k, v in ctx.items()
            }
        errors.append(item)
    return _validation_error(errors)


def _is_json_media(content_type: str) -> bool:
    """FastAPI parses a body as JSON for ``application/json`` and ``application/*+json``."""
    media = content_type.split(";", 1)[0].strip().lower()
    if not media.startswith("application/"):
        return False
    subtype = media[len("application/") :]
    return subtype == "json" or subtype.endswith("+json")


def decode_json_body(body: bytes, content_type: str | None) -> Any:
    """The body as JSON, or the error FastAPI + vLLM's ``validate_json_request`` give."""
    value: Any = None
    if body and (not content_type or _is_json_media(content_type)):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            raise _validation_error(
                [
                    {
                        "type": "json_invalid",
                        "loc": f"body.{exc.pos}",
                        "msg": "JSON decode error",
                        "input": "<dict of 0 items>",
                        "ctx": {"error": exc.msg},
                    }
                ]
            ) from None
        except (ValueError, RecursionError):
            # Bad UTF-8 or nesting too deep: FastAPI's generic body-parsing failure.
            raise FastApiHttpError(400, "There was an error parsing the body") from None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise OpenAIError(
            400,
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            "Bad Request",
            None,
        )
    if not body:
        raise _validation_error(
            [{"type": "missing", "loc": "body", "msg": "Field required", "input": "None"}]
        )
    return value


def _validate(cls: type[_M], value: Any) -> _M:
    try:
        return cls.model_validate(value)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: never a 500
        raise OpenAIError(400, str(exc), "Bad Request", None) from None


# --- semantic checks ---


def resolve_model(name: str | None, ctx: ModelContext) -> tuple[str, str | None]:
    """(name echoed in responses, adapter name or None); unknown names are vLLM's 404."""
    if name is None or name == ctx.served_model or name in ctx.aliases:
        return (ctx.served_model if name is None else name), None
    if name in ctx.loras:
        return name, name
    raise model_not_found(name, [ctx.served_model, *ctx.aliases])


def _check_prompt_ids(ids: list[int], ctx: ModelContext) -> None:
    vocab = ctx.tokenizer.vocab_size
    for tid in ids:
        if tid < 0 or tid >= vocab:
            raise bad_request(f"Token id {tid} is out of vocabulary", "prompt")


def _check_length(num_tokens: int, ctx: ModelContext) -> None:
    if num_tokens > ctx.max_model_len:
        # vLLM tokenizes with truncation at max_model_len + 1, so it only knows "at least".
        over = ctx.max_model_len + 1
        raise bad_request(
            f"This model's maximum context length is {ctx.max_model_len} tokens. However, your "
            f"prompt contains at least {over} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            over,
        )


def _verify_sampling(body: _SamplingFields, max_tokens: int) -> None:
    """``SamplingParams._verify_args`` in vLLM's order, for the parameters the sim reads."""
    if body.n < 1:
        raise bad_request(f"n must be at least 1, got {body.n}.", "n", body.n)
    if body.n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {body.n}.", "n", body.n)
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(body, name)
        if v is not None and not -2.0 <= v <= 2.0:
            raise bad_request(f"{name} must be in [-2, 2], got {v}.", name, v)
    rp = body.repetition_penalty
    if rp is not None and not rp > 0.0:
        raise bad_request(
            f"repetition_penalty must be greater than zero, got {rp}.", "repetition_penalty", rp
        )
    t = body.temperature
    if t is not None and t < 0.0:
        t = float(t)
        raise bad_request(f"temperature must be non-negative, got {t}.", "temperature", t)
    tp = body.top_p
    if tp is not None and not 0.0 < tp <= 1.0:
        tp = float(tp)
        raise bad_request(f"top_p must be in (0, 1], got {tp}.", "top_p", tp)
    tk = body.top_k
    if tk is not None and tk < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {tk}.", "top_k", tk)
    mp = body.min_p
    if mp is not None and not 0.0 <= mp <= 1.0:
        mp = float(mp)
        raise bad_request(f"min_p must be in [0, 1], got {mp}.", "min_p", mp)
    if max_tokens < 1:
        raise bad_request(
            f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens
        )
    if body.min_tokens < 0:
        raise bad_request(
            f"min_tokens must be greater than or equal to 0, got {body.min_tokens}.",
            "min_tokens",
            body.min_tokens,
        )
    if body.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
            f"got {body.min_tokens}.",
            "min_tokens",
            body.min_tokens,
        )


def _stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(s for s in stop if s)


def _finish(
    kind: Literal["completion", "chat"],
    body: _SamplingFields,
    model: str,
    lora: str | None,
    prompts: list[list[int]],
    requested: int | None,
    ctx: ModelContext,
    logprobs: int | None,
) -> GenerateRequest:
    clamped: list[int] = []
    for ids in prompts:
        _check_length(len(ids), ctx)
        room = ctx.max_model_len - len(ids)
        # vLLM clamps an over-long request to the remaining context instead of rejecting it.
        clamped.append(room if requested is None else min(requested, room))
    for mt in clamped:
        _verify_sampling(body, mt)
    if logprobs is not None and logprobs < 0:
        raise bad_request(f"logprobs must be non-negative, got {logprobs}.", "logprobs", logprobs)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(
            f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
            f"{MAX_LOGPROBS}",
            "logprobs",
            logprobs,
        )
    opts = body.stream_options
    stream = bool(body.stream)
    if opts is not None and not stream:
        raise OpenAIError(
            400,
            "1 validation error:\n  Value error, Stream options can only be defined when "
            "`stream=True`.",
            "Bad Request",
            None,
        )
    include_usage = bool(opts is not None and opts.include_usage)
    return GenerateRequest(
        kind=kind,
        model=model,
        lora_name=lora,
        prompts=prompts,
        max_tokens=clamped,
        max_tokens_param=requested,
        n=body.n,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=bool(include_usage and opts is not None and opts.continuous_usage_stats),
        stop=_stop_tuple(body.stop),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        logprobs=logprobs,
        return_token_ids=bool(body.return_token_ids),
        priority=body.priority,
    )


def parse_completion(body: bytes, content_type: str | None, ctx: ModelContext) -> GenerateRequest:
    req = _validate(CompletionBody, decode_json_body(body, content_type))
    model, lora = resolve_model(req.model, ctx)
    prompt = req.prompt
    prompts: list[list[int]]
    if prompt is None or (isinstance(prompt, (str, list)) and len(prompt) == 0):
        raise bad_request(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )
    if isinstance(prompt, str):
        prompts = [ctx.tokenizer.encode(prompt)]
    elif isinstance(prompt[0], int):
        prompts = [[int(t) for t in prompt if isinstance(t, int)]]
    elif isinstance(prompt[0], str):
        prompts = [ctx.tokenizer.encode(p) for p in prompt if isinstance(p, str)]
    else:
        prompts = [list(p) for p in prompt if isinstance(p, list)]
    for ids in prompts:
        if not ids:
            raise bad_request(
                "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
            )
        _check_prompt_ids(ids, ctx)
    out = _finish("completion", req, model, lora, prompts, req.max_tokens, ctx, req.logprobs)
    out.echo = bool(req.echo)
    return out


def parse_chat(body: bytes, content_type: str | None, ctx: ModelContext) -> GenerateRequest:
    req = _validate(ChatBody, decode_json_body(body, content_type))
    model, lora = resolve_model(req.model, ctx)
    if not req.messages:
        raise OpenAIError(
            400,
            "Cannot apply chat template to an empty conversation. Provide at least one message.",
            "BadRequestError",
            None,
        )
    text = ctx.tokenizer.apply_chat_template(
        req.messages, add_generation_prompt=req.add_generation_prompt
    )
    ids = ctx.tokenizer.encode(text)
    # ``max_completion_tokens`` supersedes the deprecated ``max_tokens`` (vLLM: ``a or b``).
    requested = req.max_completion_tokens or req.max_tokens
    if requested is None and (req.max_completion_tokens == 0 or req.max_tokens == 0):
        requested = 0
    top = None
    if req.logprobs:
        top = req.top_logprobs or 0
        if top < 0:
            raise bad_request(f"top_logprobs must be non-negative, got {top}.", "top_logprobs")
    out = _finish("chat", req, model, lora, [ids], requested, ctx, top)
    out.prompt_texts = [text]
    return out


def parse_tokenize(body: bytes, content_type: str | None, ctx: ModelContext) -> TokenizeRequest:
    value = decode_json_body(body, content_type)
    if isinstance(value, dict) and "messages" in value:
        chat = _validate(TokenizeChatBody, value)
        model, _ = resolve_model(chat.model, ctx)
        if not chat.messages:
            raise OpenAIError(
                400,
                "Cannot apply chat template to an empty conversation. "
                "Provide at least one message.",
                "BadRequestError",
                None,
            )
        text = ctx.tokenizer.apply_chat_template(
            chat.messages, add_generation_prompt=chat.add_generation_prompt
        )
        # The template already renders BOS; vLLM does not add it again for chat.
        ids = ctx.tokenizer.encode(text)
        return TokenizeRequest(model, ids, bool(chat.return_token_strs))
    prompt = _validate(TokenizePromptBody, value)
    model, _ = resolve_model(prompt.model, ctx)
    # The golden model's tokenizer has ``add_bos_token: false``: special tokens add nothing.
    ids = ctx.tokenizer.encode(prompt.prompt)
    return TokenizeRequest(model, ids, bool(prompt.return_token_strs))


def parse_detokenize(body: bytes, content_type: str | None, ctx: ModelContext) -> DetokenizeRequest:
    req = _validate(DetokenizeBody, decode_json_body(body, content_type))
    model, _ = resolve_model(req.model, ctx)
    vocab = ctx.tokenizer.vocab_size
    for tid in req.tokens:
        if tid < 0 or tid >= vocab:
            raise bad_request(f"Token id {tid} is out of vocabulary", "tokens")
    return DetokenizeRequest(model, list(req.tokens))


def parse_load_lora(body: bytes, content_type: str | None) -> LoadLoraRequest:
    req = _validate(LoadLoraBody, decode_json_body(body, content_type))
    if not req.lora_name or not req.lora_path:
        raise OpenAIError(
            400,
            "Both 'lora_name' and 'lora_path' must be provided.",
            "InvalidUserInput",
            None,
        )
    return LoadLoraRequest(req.lora_name, req.lora_path, req.load_inplace)


def parse_unload_lora(body: bytes, content_type: str | None) -> UnloadLoraRequest:
    req = _validate(UnloadLoraBody, decode_json_body(body, content_type))
    if not req.lora_name:
        raise OpenAIError(
            400,
            "'lora_name' needs to be provided to unload a LoRA adapter.",
            "InvalidUserInput",
            None,
        )
    return UnloadLoraRequest(req.lora_name)
