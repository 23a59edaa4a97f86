"""The gateway: OpenAI-compatible endpoints in front of the engines.

One request, start to end:

1. identify the caller (API key -> tenant and default priority; open router: headers);
2. read the body under ``max_body_bytes`` (413) and parse it exactly once (400 if malformed);
3. resolve the model against what the engines serve (404 unknown, 503 with no endpoints);
4. tokenize the prompt and hash its blocks with the engines' block size (for prefix affinity);
5. admission: wait for capacity in the model's priority/fair-share queue, or be refused (429);
6. route through the model's pipeline (or the ``x-shoal-strategy`` override) and send;
7. a failure before the first response byte (connection error, 5xx) is retried on another
   endpoint, up to ``max_attempts``; repeated failures eject the endpoint (engine state);
8. the engine's response is passed through chunk by chunk as it arrives (no buffering), with
   ``x-shoal-endpoint`` naming the endpoint; a client disconnect cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from shoal.hashing import block_hashes
from shoal.router.admission import AdmissionController, Rejected
from shoal.router.api_keys import ApiKeyTable
from shoal.router.catalog import DeclaredCatalog
from shoal.router.config import RouterConfig, priority_from_name
from shoal.router.engine_state import EngineStateStore
from shoal.router.errors import ApiError
from shoal.router.exchange import AsgiExchange, BodyTooLarge, ClientGone, HttpExchange
from shoal.router.holding import HoldFull, HoldQueue, HoldTimeout, NoLongerDeclared
from shoal.router.kv_index import KvEventIndex
from shoal.router.metrics import CONTENT_TYPE, RouterMetrics
from shoal.router.pipeline import RoutingPipeline
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.server_protocol import ConnectionWatch
from shoal.router.shared_state import SharedState
from shoal.router.strategies import PipelineSet, check_strategy
from shoal.router.types import EndpointState, Priority, RoutingRequest
from shoal.router.upstream import Upstream, UpstreamError, UpstreamResponse, header
from shoal.sim.catalog import get_model
from shoal.sim.tokenizer import SimTokenizer

log = logging.getLogger(__name__)

ENDPOINT_HEADER = "x-shoal-endpoint"
STRATEGY_HEADER = "x-shoal-strategy"
PRIORITY_HEADER = "x-shoal-priority"
TENANT_HEADER = "x-shoal-tenant"
SESSION_HEADER = "x-session-id"

# Routing needs the prompt's prefix, not all of it: cap the work a huge prompt costs the loop.
MAX_TOKENIZED_CHARS = 256 * 1024
MAX_ROUTING_BLOCKS = 1024
MAX_SESSION_ID = 256
_USAGE_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL_BYTES = 512
# Headers of the engine's response that the router must not copy (hop-by-hop, or set by the
# router's own server). content-length is kept for a non-streamed body (see PassthroughResponse).
_DROP_RESPONSE_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server", b"content-length"}
)


# --------------------------------------------------------------------------- errors and bodies


# Inference paths the gateway proxies, and the request kind each body is parsed as.
PROXY_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


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


# The request headers the gateway reads (ASGI servers give names in lower case).
_READ_HEADERS = frozenset(
    name.encode()
    for name in (
        "content-length",
        "authorization",
        "accept",
        "x-request-id",
        PRIORITY_HEADER,
        TENANT_HEADER,
        STRATEGY_HEADER,
        SESSION_HEADER,
    )
)


def read_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers the gateway reads, picked out in one pass (the first of repeated ones, as
    Starlette's ``Headers.get``); looking each up in a Starlette ``Headers`` scans the whole
    list every time, eight times per request."""
    found: dict[str, str] = {}
    for name, value in raw:
        if name in _READ_HEADERS:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


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
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        if default_model is None:
            raise _bad("'model' is required", "model")
        model = default_model()
    elif not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string", "model")
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
            raise _bad("'messages' must be a list of message objects", "messages")
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
            raise _bad("'prompt' must be a string, a list of strings or token ids", "prompt")
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


# ------------------------------------------------------------------------------ the gateway


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    priority: Priority
    # True when the router authenticated the caller itself: its key is not forwarded upstream.
    authenticated: bool


class Gateway:
    """The request handlers; everything they use is passed in (no globals)."""

    def __init__(
        self,
        config: RouterConfig,
        store: EngineStateStore,
        pipelines: PipelineSet,
        admission: AdmissionController,
        metrics: RouterMetrics,
        upstream: Upstream,
        *,
        tokenizers: TokenizerProvider | None = None,
        approx_index: ApproxPrefixIndex | None = None,
        kv_index: KvEventIndex | None = None,
        shared: SharedState | None = None,
        catalog: DeclaredCatalog | None = None,
        holds: HoldQueue | None = None,
        api_keys: ApiKeyTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.holds = holds
        self.config = config
        self.store = store
        self.pipelines = pipelines
        self.admission = admission
        self.metrics = metrics
        self.upstream = upstream
        self.tokenizers = tokenizers or SimTokenizers()
        self.approx_index = approx_index
        self.kv_index = kv_index
        self.shared = shared
        self._clock = clock
        self.api_keys = api_keys if api_keys is not None else ApiKeyTable(config.api_keys)

    # ------------------------------------------------------------------------- plain routes

    async def health(self, request: Request) -> Response:
        states = self.store.states()
        return JSONResponse(
            {
                "status": "ok",
                "endpoints": len(states),
                "healthy_endpoints": sum(1 for s in states if s.healthy and not s.stale),
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        now = int(time.time())
        data = [
            {
                "id": card.id,
                "object": "model",
                "created": now,
                "owned_by": "shoal",
                "root": card.id if card.parent is None else card.parent,
                "parent": card.parent,
            }
            for card in self.store.model_cards()
        ]
        # Declared names no engine serves yet are listed too: a request for them is held
        # until they are (scale from zero, adapter loading), so they are usable names.
        served = {card["id"] for card in data}
        for declared in self.catalog.entries() if self.catalog is not None else ():
            if declared.name not in served:
                data.append(
                    {
                        "id": declared.name,
                        "object": "model",
                        "created": now,
                        "owned_by": "shoal",
                        "root": declared.base,
                        "parent": declared.parent,
                    }
                )
        return JSONResponse({"object": "list", "data": data})

    def direct_route(
        self, method: str, path: str
    ) -> Callable[[HttpExchange], Awaitable[None]] | None:
        """The handler of a request the gateway answers itself (the inference routes), for a
        server that hands it over without ASGI (router/http_server.py); None for the others."""
        return self.serve_exchange if path in PROXY_KINDS else None

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer an inference request as an ASGI call; False if ``scope`` is not one.

        The inference routes are every request's path through the router, so they skip the
        web framework's routing and middleware layers (each wraps every ``send``).
        """
        if self.direct_route(scope["method"], scope["path"]) is None:
            return False
        await self.serve_exchange(AsgiExchange(scope, receive, send))
        return True

    async def serve_exchange(self, exchange: HttpExchange) -> None:
        """Answer one inference request. What a web framework would add is kept: an unexpected
        exception is logged and answered with an OpenAI-shaped 500 when no byte of the
        response went out yet."""
        path = exchange.path
        try:
            if exchange.method != "POST":
                response: GatewayResponse = ApiError(
                    405,
                    f"{path} takes POST, not {exchange.method}",
                    "invalid_request_error",
                    extra_headers={"allow": "POST"},
                )
            else:
                response = await self._handle(exchange, PROXY_KINDS[path], path)
            await response.send_to(exchange)
        except Exception:
            log.exception("unexpected error serving %s", path)
            if exchange.response_started:
                raise  # the server closes the connection: a truncated response, not a hang
            error = ApiError(500, "internal router error", "internal_server_error")
            await error.send_to(exchange)

    # ---------------------------------------------------------------------------- pieces

    def _tokenizer_for(self, model: str) -> PromptTokenizer:
        return self.tokenizers.for_model(self.store.model_root(model))

    def _default_model(self) -> str:
        """The model of a request that names none: the fleet's only base model. The body goes
        upstream as it came, and an engine answers a model-less request with its default (its
        first served name), which is that model."""
        bases = self.store.base_models()
        if len(bases) == 1:
            return bases[0]
        if not bases:
            raise self._no_endpoint("", "no_endpoints")
        shown = ", ".join(bases[:10]) + (f" and {len(bases) - 10} more" if len(bases) > 10 else "")
        raise _bad(
            f"'model' is required: this router serves {len(bases)} models ({shown})", "model"
        )

    def _identify(self, headers: Mapping[str, str]) -> Identity:
        header_priority = headers.get(PRIORITY_HEADER)
        asked: Priority | None = None
        if header_priority:
            try:
                asked = priority_from_name(header_priority)
            except ValueError as exc:
                raise _bad(str(exc), PRIORITY_HEADER) from None
        keys = self.api_keys
        if keys.open:
            tenant = headers.get(TENANT_HEADER) or "default"
            return Identity(tenant[:MAX_SESSION_ID], asked or Priority.STANDARD, False)
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        grant = keys.lookup(key)
        if grant is None:
            raise ApiError(
                401, "missing or invalid API key", "invalid_request_error", code="invalid_api_key"
            )
        # A key may lower its requests' priority by header, never raise it.
        priority = grant.priority if asked is None else max(asked, grant.priority)
        return Identity(grant.tenant, priority, True)

    async def _read_body(self, exchange: HttpExchange, headers: Mapping[str, str]) -> bytes:
        limit = self.config.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", "invalid_request_error")
        try:
            return await exchange.read_body(limit)
        except BodyTooLarge:
            raise ApiError(
                413, f"request body exceeds {limit} bytes", "invalid_request_error"
            ) from None

    def _no_endpoint(self, model: str, reason: str) -> ApiError:
        self.metrics.rejections.labels(model, reason).inc()
        return ApiError(
            503,
            f"no endpoint can serve model {model!r} right now",
            "service_unavailable",
            code=reason,
            retry_after_s=1,
        )

    async def _resolve_declared(self, name: str) -> tuple[str, str | None]:
        """A name no engine serves: hold the request if it is declared, else 404 (or 503)."""
        catalog = self.catalog
        declared = catalog.get(name) if catalog is not None else None
        if declared is None or catalog is None or self.holds is None:
            if not any(s.healthy for s in self.store.states()):
                raise self._no_endpoint("", "no_endpoints")
            self.metrics.count_request("", "", "404")
            raise ApiError(
                404,
                f"The model `{name}` does not exist.",
                "NotFoundError",
                param="model",
                code="model_not_found",
            )
        base = declared.base
        try:
            resolved = await self.holds.wait(
                name,
                base,
                self.store.resolve_servable,
                still_declared=lambda n: catalog.get(n) is not None,
            )
        except NoLongerDeclared:
            self.metrics.hold_outcomes.labels(base, "undeclared").inc()
            self.metrics.count_request("", "", "404")
            raise ApiError(
                404,
                f"The model `{name}` does not exist (it was deleted while the request waited).",
                "NotFoundError",
                param="model",
                code="model_not_found",
            ) from None
        except HoldFull:
            self.metrics.hold_outcomes.labels(base, "full").inc()
            self.metrics.count_request(base, "", "503")
            raise self._no_endpoint(base, "hold_full") from None
        except HoldTimeout:
            self.metrics.hold_outcomes.labels(base, "timeout").inc()
            self.metrics.count_request(base, "", "503")
            self.metrics.rejections.labels(base, "not_ready").inc()
            raise ApiError(
                503,
                f"`{name}` is declared but no engine serves it yet (scaling up from zero or "
                f"loading the adapter); waited {self.holds.timeout_s:g}s",
                "service_unavailable",
                code="not_ready",
                retry_after_s=max(1, int(self.holds.timeout_s / 4)),
            ) from None
        self.metrics.hold_outcomes.labels(base, "served").inc()
        return resolved

    @staticmethod
    def _upstream_headers(headers: Mapping[str, str], identity: Identity) -> dict[str, str]:
        sent = {"content-type": "application/json"}
        for name in ("accept", "x-request-id"):
            value = headers.get(name)
            if value is not None:
                sent[name] = value
        if not identity.authenticated:
            auth = headers.get("authorization")
            if auth is not None:
                sent["authorization"] = auth  # the engines' own key, if they have one
        return sent

    def _record_prefix_estimate(
        self, rreq: RoutingRequest, strategy: str, matched: Mapping[str, int], url: str
    ) -> None:
        total = len(rreq.block_hashes)
        if total == 0:
            return
        hit = matched.get(url, 0)
        self.metrics.prefix_blocks.labels(strategy, "prompt").inc(total)
        self.metrics.prefix_blocks.labels(strategy, "matched").inc(hit)
        self.metrics.prefix_hit_ratio.labels(strategy).observe(hit / total)

    def _prefix_matches(
        self, rreq: RoutingRequest, strategy: str, candidates: Sequence[EndpointState]
    ) -> Mapping[str, int]:
        if not rreq.block_hashes:
            return {}
        urls = [c.url for c in candidates]
        if strategy == "kv-aware" and self.kv_index is not None:
            return self.kv_index.match(rreq.block_hashes, urls)
        if self.approx_index is not None:
            return self.approx_index.match(rreq.block_hashes, urls)
        return {}

    # ---------------------------------------------------------------------------- the proxy

    async def _handle(self, exchange: HttpExchange, kind: str, path: str) -> GatewayResponse:
        started = self._clock()
        headers = read_headers(exchange.headers)
        try:
            identity = self._identify(headers)
            try:
                raw = await self._read_body(exchange, headers)
            except ClientGone:
                return CLIENT_LEFT
        except ApiError as err:
            return err
        watch = DisconnectWatch(exchange.disconnected, asyncio.current_task(), exchange.connection)
        watch.guard(True)
        response: GatewayResponse | None = None
        try:
            response = await self._route(headers, raw, kind, path, identity, started, watch)
        except ApiError as err:
            response = err
        except asyncio.CancelledError:
            if not watch.absorb_cancellation():
                raise  # the server is shutting down, not the client leaving
            # Ours: the client left before the engine answered.
            self.metrics.count_request(watch.model, watch.endpoint, "499")
            response = CLIENT_LEFT
        finally:
            if not isinstance(response, PassthroughResponse):
                await watch.close()  # a passthrough response closes it after its last byte
        return response

    async def _route(
        self,
        headers: Mapping[str, str],
        raw: bytes,
        kind: str,
        path: str,
        identity: Identity,
        started: float,
        watch: DisconnectWatch,
    ) -> GatewayResponse:
        """Parse, admit and dispatch one request whose body has been read."""
        parsed = parse_body(raw, kind, self._tokenizer_for, self._default_model, tokenize=False)
        strategy = headers.get(STRATEGY_HEADER) or None
        if strategy is not None:
            try:
                check_strategy(strategy)
            except ValueError as exc:
                raise _bad(str(exc), STRATEGY_HEADER) from None
        resolved = self.store.resolve_model(parsed.model)
        if resolved is None:
            resolved = await self._resolve_declared(parsed.model)
        base, lora = resolved
        watch.model = base
        pipeline = self.pipelines.for_model(base, strategy)
        # Tokenizing and hashing the prompt is the largest piece of the gateway's own work per
        # request: done only when the pipeline reads the tokens (prefix scorers, in-flight
        # tokens) or the configuration asks for every request's prefix history.
        if self.config.tokenize_prompts == "always" or pipeline.reads_prompt_tokens:
            tokenize_prompt(parsed)
        session = headers.get(SESSION_HEADER) or parsed.user
        expected = (
            parsed.max_tokens
            if parsed.max_tokens is not None
            else self.config.expected_output_tokens
        )
        size = self.store.block_size_for(base)
        ids = parsed.prompt_token_ids[: MAX_ROUTING_BLOCKS * size]
        rreq = RoutingRequest(
            model=parsed.model,
            base_model=base,
            lora=lora,
            prompt_token_ids=parsed.prompt_token_ids,
            block_hashes=block_hashes(ids, size, lora),
            expected_output_tokens=expected,
            session_id=session[:MAX_SESSION_ID] if session else None,
            tenant=identity.tenant,
            priority=identity.priority,
            stream=parsed.stream,
            strategy=strategy,
        )
        try:
            ticket = await self.admission.admit(
                base, identity.tenant, identity.priority, parsed.prompt_tokens, expected
            )
        except Rejected as exc:
            self.metrics.rejections.labels(base, exc.reason).inc()
            self.metrics.count_request(base, "", "429")
            raise ApiError(
                429,
                f"model {base!r} is at capacity ({exc.reason.replace('_', ' ')}); retry later",
                "rate_limit_error",
                code=exc.reason,
                retry_after_s=exc.retry_after_s,
            ) from None
        self.metrics.queue_wait.labels(base).observe(ticket.queued_s)
        try:
            return await self._dispatch(
                headers,
                raw,
                path,
                rreq,
                pipeline,
                parsed,
                identity,
                started,
                ticket.dispatched,
                watch,
            )
        finally:
            ticket.dispatched()  # no-op when _dispatch already handed off

    async def _dispatch(
        self,
        request_headers: Mapping[str, str],
        raw: bytes,
        path: str,
        rreq: RoutingRequest,
        pipeline: RoutingPipeline,
        parsed: ParsedBody,
        identity: Identity,
        started: float,
        on_in_flight: Callable[[], None],
        watch: DisconnectWatch,
    ) -> PassthroughResponse:
        base = rreq.base_model
        headers = self._upstream_headers(request_headers, identity)
        cost = parsed.prompt_tokens + rreq.expected_output_tokens
        excluded: set[str] = set()
        last_failure: str | None = None
        for attempt in range(self.config.max_attempts):
            candidates = [s for s in self.store.states() if s.url not in excluded]
            matched = self._prefix_matches(rreq, pipeline.name, candidates) if attempt == 0 else {}
            decision = pipeline.decide(rreq, candidates)
            if decision is None:
                break
            url = decision.endpoint.url
            self.metrics.decisions.labels(pipeline.name, decision.deciding_scorer).inc()
            if attempt == 0:
                self._record_prefix_estimate(rreq, pipeline.name, matched, url)
            else:
                self.metrics.retries.labels(base).inc()
            if self.shared is not None:
                self.shared.record(rreq.block_hashes, url)
            self.store.begin(url, cost)
            watch.endpoint = url
            # The request now counts in the endpoint's in-flight load, which is what admission's
            # capacity check reads: let the next waiter go. Waiting for the engine's response
            # headers instead would drain the queue one whole (non-streamed) response at a time.
            on_in_flight()
            try:
                upstream = await self.upstream.post(url, path, raw, headers)
            except UpstreamError as exc:
                last_failure = str(exc)
                self._failed(url, base, cost)
                excluded.add(url)
                continue
            except BaseException:
                self.store.end(url, cost)
                raise
            if upstream.status_code >= 500:
                last_failure = f"HTTP {upstream.status_code}"
                await upstream.aclose()
                self._failed(url, base, cost)
                excluded.add(url)
                continue
            self.store.record_success(url)
            return PassthroughResponse(
                upstream,
                url,
                watch,
                on_done=self._finisher(rreq, parsed, identity, url, cost, started),
            )
        if last_failure is not None:
            self.metrics.rejections.labels(base, "upstream_failed").inc()
            self.metrics.count_request(base, "", "502")
            raise ApiError(
                502,
                f"every attempt failed before a response (last: {last_failure})",
                "upstream_error",
                code="upstream_failed",
                retry_after_s=1,
            )
        self.metrics.count_request(base, "", "503")
        raise self._no_endpoint(base, "no_endpoint")

    def _failed(self, url: str, model: str, cost: int) -> None:
        self.store.end(url, cost)
        if self.store.record_failure(url):
            self.metrics.ejections.labels(url).inc()
            log.warning("ejected endpoint %s after repeated failures", url)

    def _finisher(
        self,
        rreq: RoutingRequest,
        parsed: ParsedBody,
        identity: Identity,
        url: str,
        cost: int,
        started: float,
    ) -> Callable[[StreamOutcome], None]:
        base = rreq.base_model

        def done(outcome: StreamOutcome) -> None:
            self.store.end(url, cost)
            if outcome.upstream_error:
                self._failed_after_first_byte(url)
            m = self.metrics
            now = self._clock()
            status = "499" if outcome.client_disconnected else str(outcome.status)
            m.count_request(base, url, status)
            m.e2e.labels(base).observe(now - started)
            if parsed.stream and outcome.first_chunk_at is not None:
                m.ttft.labels(base).observe(outcome.first_chunk_at - started)
                tokens = outcome.output_tokens
                if tokens is not None and tokens > 1:
                    m.tpot.labels(base).observe((now - outcome.first_chunk_at) / (tokens - 1))
            if outcome.output_tokens is not None:
                self.admission.settle(
                    base, identity.tenant, rreq.expected_output_tokens, outcome.output_tokens
                )
            self.admission.pump(base)

        return done

    def _failed_after_first_byte(self, url: str) -> None:
        if self.store.record_failure(url):
            self.metrics.ejections.labels(url).inc()


# --------------------------------------------------------------------------- the passthrough


class DisconnectWatch:
    """Cancels the request's task when the client disconnects, from the moment its body is read
    until the response's last byte: a non-streamed request spends its whole generation waiting
    for the engine's response headers, and a client that leaves then must abort it too.

    Under Shoal's own servers the connection says when it is lost
    (:class:`~shoal.router.server_protocol.ConnectionWatch`, the exchange's ``connection``).
    Under any other ASGI server a task waits for the exchange's ``disconnected()`` (a
    ``receive()`` of ``http.disconnect``; the body reader owns ``receive`` before it). Servers
    also report a disconnect after a complete response, so the task is cancelled only while it
    is guarded. ``task`` is the request's
    task, which serves the request from its body to its last byte (the response is sent from it
    too).
    """

    def __init__(
        self,
        wait_disconnect: Callable[[], Awaitable[object]],
        task: asyncio.Task[Any] | None,
        connection: ConnectionWatch | None = None,
    ) -> None:
        self.task = task
        self._guarded = False
        self.cancelled_request = False  # True once the client left mid-request
        # Where the request had got to, for counting a disconnect before the engine answered.
        self.model = ""
        self.endpoint = ""
        self._connection = connection
        self._watcher: asyncio.Task[None] | None = None
        if connection is not None:
            # Bound methods compare equal per instance, so close() can discard this one.
            connection.listeners.add(self._client_left)
        else:
            # Through the task's loop: asyncio.get_running_loop() costs a getpid() system call
            # per call on Python 3.11.
            loop = task.get_loop() if task is not None else asyncio.get_running_loop()
            self._watcher = loop.create_task(self._watch(wait_disconnect))

    def guard(self, on: bool) -> None:
        """Cancel the request's task on disconnect (False: the response is complete)."""
        self._guarded = on and self.task is not None
        if self._guarded and self._connection is not None and self._connection.lost:
            self._client_left()  # it left before we listened

    def _client_left(self) -> None:
        if self._guarded and self.task is not None:
            self.cancelled_request = True
            self.task.cancel()

    async def _watch(self, wait_disconnect: Callable[[], Awaitable[object]]) -> None:
        await wait_disconnect()
        self._client_left()

    def absorb_cancellation(self) -> bool:
        """After the request's task caught a CancelledError: True, with the cancellation taken
        back, if this watch caused it (the client left); False if it came from elsewhere
        (shutdown), and the caller must re-raise it."""
        if not self.cancelled_request or self.task is None:
            return False
        self.task.uncancel()
        return True

    async def close(self) -> None:
        self._guarded = False
        if self._connection is not None:
            self._connection.listeners.discard(self._client_left)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher


@dataclass(slots=True)
class StreamOutcome:
    status: int
    first_chunk_at: float | None = None
    output_tokens: int | None = None
    client_disconnected: bool = False
    upstream_error: bool = False


class GatewayResponse(Protocol):
    """What the gateway answers an inference request with."""

    async def send_to(self, exchange: HttpExchange) -> None: ...


class _ClientLeft:
    """The answer to a request whose client left: a 499 that nobody reads (the server drops
    writes to a lost connection), so that the exchange still ends with a response."""

    async def send_to(self, exchange: HttpExchange) -> None:
        await exchange.start_response(499, [(b"content-length", b"0")])
        await exchange.write_body(b"", more=False)


CLIENT_LEFT = _ClientLeft()


class PassthroughResponse:
    """Sends the engine's response to the client chunk by chunk as it arrives.

    The request's :class:`DisconnectWatch` keeps guarding while it streams: on disconnect the
    send loop is cancelled and the upstream response closed, which closes its connection, and the
    engine aborts the request (vLLM and ``shoal sim`` abort on disconnect). Waiting for the next
    ``send`` to fail would leave a stalled generation running until it produced another token.
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        endpoint_url: str,
        watch: DisconnectWatch,
        on_done: Callable[[StreamOutcome], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.endpoint_url = endpoint_url
        self._watch = watch
        self._on_done = on_done
        self._clock = clock
        self._streaming = b"text/event-stream" in (header(upstream, b"content-type") or b"")
        self.raw_headers = [(k, v) for k, v in upstream.headers if k not in _DROP_RESPONSE_HEADERS]
        # A non-streamed body goes out with the engine's length, as it came (the bytes are not
        # changed), so a client can tell a body cut short from a complete one; it also spares
        # the chunk framing, one socket write per response (within noise of the router's CPU
        # per request side by side: median 0.53 ms both ways).
        length = None if self._streaming else header(upstream, b"content-length")
        if length is not None:
            self.raw_headers.append((b"content-length", length))
        self.raw_headers.append((ENDPOINT_HEADER.encode(), endpoint_url.encode()))

    async def send_to(self, exchange: HttpExchange) -> None:
        outcome = StreamOutcome(status=self.status_code)
        # The body is pumped in the request's task (no task of its own: two fewer event-loop
        # hops per request), which the watch cancels if the client leaves mid-response.
        self._watch.guard(True)
        try:
            await self._pump(exchange, outcome)
        except asyncio.CancelledError:
            if not self._watch.absorb_cancellation():
                raise  # the server is shutting down, not the client leaving
            # Ours: go on to clean up.
            outcome.client_disconnected = True
        finally:
            await self._watch.close()
            with contextlib.suppress(BaseException):
                await self.upstream.aclose()
            try:
                self._on_done(outcome)
            except Exception:
                log.exception("request accounting failed")

    async def _pump(self, exchange: HttpExchange, outcome: StreamOutcome) -> None:
        await exchange.start_response(self.status_code, self.raw_headers)
        events = 0
        tail = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                if not chunk:
                    continue
                if outcome.first_chunk_at is None:
                    outcome.first_chunk_at = self._clock()
                if self._streaming:
                    events += chunk.count(b"data: ")
                tail = (tail + chunk)[-_TAIL_BYTES:]
                await exchange.write_body(chunk, more=True)
        except UpstreamError as exc:
            # The engine failed mid-response: nothing to retry (bytes already went out).
            # Returning without the last message makes the server close the connection, which
            # is how the client learns that the body is incomplete, rather than a hang; ending
            # it normally would pass a truncated body (or a stream without [DONE]) as complete.
            outcome.upstream_error = True
            log.warning("upstream %s failed mid-response: %r", self.endpoint_url, exc)
            return
        except OSError:
            outcome.client_disconnected = True
            return
        usage = _USAGE_TOKENS.findall(tail)
        if usage:
            outcome.output_tokens = int(usage[-1])
        elif self._streaming and events:
            outcome.output_tokens = max(0, events - 1)  # minus the closing [DONE]
        self._watch.guard(False)  # complete: a disconnect from here on is the normal end
        await exchange.write_body(b"", more=False)
