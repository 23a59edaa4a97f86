"""The gateway: OpenAI-compatible endpoints in front of the engines.

One request, start to end:

1. identify the caller (API key -> tenant and default priority; open router: headers);
2. read the body under ``max_body_bytes`` (413) and parse it exactly once (400 if malformed;
   router/request_body.py);
3. resolve the model against what the engines serve (404 unknown, 503 with no endpoints);
4. tokenize the prompt and hash its blocks with the engines' block size (for prefix affinity),
   when the routing pipeline reads tokens;
5. admission: wait for capacity in the model's priority/fair-share queue, or be refused (429);
6. route through the model's pipeline (or the ``x-shoal-strategy`` override) and send;
7. a failure before the first response byte (connection error, 5xx) is retried on another
   endpoint, up to ``max_attempts``; repeated failures eject the endpoint (engine state);
8. the engine's response is passed through chunk by chunk as it arrives (no buffering), with
   ``x-shoal-endpoint`` naming the endpoint; a client disconnect cancels the upstream request
   (router/passthrough.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from shoal.hashing import block_hashes
from shoal.router.admission import AdmissionController, Rejected
from shoal.router.api_keys import ApiKeyTable
from shoal.router.catalog import DeclaredCatalog
from shoal.router.config import RouterConfig, priority_from_name
from shoal.router.engine_state import EngineStateStore
from shoal.router.errors import ApiError, bad_request
from shoal.router.exchange import AsgiExchange, BodyTooLarge, ClientGone, HttpExchange
from shoal.router.holding import HoldFull, HoldQueue, HoldTimeout, NoLongerDeclared
from shoal.router.kv_index import KvEventIndex
from shoal.router.metrics import CONTENT_TYPE, RouterMetrics
from shoal.router.passthrough import (
    CLIENT_LEFT,
    DisconnectWatch,
    GatewayResponse,
    PassthroughResponse,
    StreamOutcome,
)
from shoal.router.pipeline import RoutingPipeline
from shoal.router.prefix_index import ApproxPrefixIndex
from shoal.router.request_body import (
    MAX_ROUTING_BLOCKS,
    ParsedBody,
    PromptTokenizer,
    SimTokenizers,
    TokenizerProvider,
    parse_body,
    tokenize_prompt,
)
from shoal.router.shared_state import SharedState
from shoal.router.strategies import PipelineSet, check_strategy
from shoal.router.types import EndpointState, Priority, RoutingRequest
from shoal.router.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

STRATEGY_HEADER = "x-shoal-strategy"
PRIORITY_HEADER = "x-shoal-priority"
TENANT_HEADER = "x-shoal-tenant"
SESSION_HEADER = "x-session-id"

MAX_SESSION_ID = 256


# Inference paths the gateway proxies, and the request kind each body is parsed as.
PROXY_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


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
        raise bad_request(
            f"'model' is required: this router serves {len(bases)} models ({shown})", "model"
        )

    def _identify(self, headers: Mapping[str, str]) -> Identity:
        header_priority = headers.get(PRIORITY_HEADER)
        asked: Priority | None = None
        if header_priority:
            try:
                asked = priority_from_name(header_priority)
            except ValueError as exc:
                raise bad_request(str(exc), PRIORITY_HEADER) from None
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
                raise bad_request(str(exc), STRATEGY_HEADER) from None
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
