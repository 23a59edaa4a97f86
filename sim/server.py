"""The simulator's HTTP server: vLLM 0.32's OpenAI server, as far as a control plane can tell.

Plain Starlette (no FastAPI): the hot paths (completions and their streams) are a body read, a
pydantic validation and a few string concatenations per token. What FastAPI would have given
for free is reproduced where a client can see it: ``{"detail": "Not Found"}`` 404s, 405s with an
``allow`` header, and pydantic-style validation errors (``sim/protocol.py``). Every response
carries ``vary: Origin`` (vLLM's CORS middleware adds it); uvicorn adds ``date`` and ``server``.

Streams and non-streamed requests alike are aborted in the engine when the client disconnects,
as vLLM does (``with_cancellation``); errors found before a stream starts are plain JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.sim.protocol import (
    DEFAULT_MAX_BODY_BYTES,
    FastApiHttpError,
    GenerateRequest,
    ModelContext,
    OpenAIError,
    body_too_large,
    decode_json_body,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_load_lora,
    parse_tokenize,
    parse_unload_lora,
)
from shoal.sim.responses import (
    DONE_EVENT,
    SYSTEM_FINGERPRINT,
    Choice,
    StreamFormatter,
    Usage,
    chat_body,
    chat_id,
    chat_logprobs,
    completion_body,
    completion_id,
    completion_logprobs,
    created_cache_tokens,
    dumps,
)
from shoal.sim.types import EngineRequest, FinishReason, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from shoal.sim.driver import AsyncEngine
    from shoal.sim.metrics import VllmMetrics

log = logging.getLogger(__name__)

_T = TypeVar("_T")

VLLM_VERSION = "0.32.0"
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"


@dataclass(slots=True)
class ServerSettings:
    # ``root`` of the base model card: the model path or name vLLM was started with.
    model_path: str = "meta-llama/Llama-3.1-8B-Instruct"
    # More names answering for the base model (vLLM's ``--served-model-name a b``).
    served_model_aliases: tuple[str, ...] = ()
    enable_prompt_tokens_details: bool = False
    # ``VLLM_SERVER_DEV_MODE``: /reset_prefix_cache and friends.
    dev_mode: bool = False
    # The SGLang-router probe endpoints (404 on a real vLLM; see ``_router_routes``).
    router_compat: bool = True
    # /v1/load_lora_adapter and /v1/unload_lora_adapter, as VLLM_ALLOW_RUNTIME_LORA_UPDATING.
    runtime_lora_updating: bool = True
    # vLLM's ``--enable-server-load-tracking``; off, /load always answers 0 as vLLM does.
    server_load_tracking: bool = False
    admin_api: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    version: str = VLLM_VERSION
    system_fingerprint: str = SYSTEM_FINGERPRINT


@dataclass(slots=True)
class Faults:
    """Failures injected through ``POST /admin/faults``."""

    error_rate: float = 0.0
    stall_seconds: float = 0.0
    slowdown: float = 1.0
    crash: bool = False


@dataclass(slots=True)
class _State:
    faults: Faults = field(default_factory=Faults)
    in_flight: int = 0
    # Request id -> (max_tokens, n) for the metrics' request_params histograms.
    params: dict[str, tuple[int, int]] = field(default_factory=dict)


# --- small response helpers ---


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


def _error(exc: OpenAIError | FastApiHttpError) -> Response:
    return _json(exc.body(), exc.status)


def _detail(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _json(dumps({"detail": detail}).encode(), status, headers)


def _internal_error(message: str) -> OpenAIError:
    return OpenAIError(500, message, "InternalServerError", None)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _listen_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _cancel_on_disconnect(receive: Receive, work: Coroutine[Any, Any, _T]) -> _T | None:
    """Run ``work``; cancel it (aborting its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_listen_for_disconnect(receive))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class _SseResponse(Response):
    """An event stream that closes its source (aborting engine requests) on disconnect.

    Starlette's StreamingResponse leaves a cancelled body iterator for the garbage collector to
    close; here ``aclose()`` runs at once so the engine frees the request's KV blocks promptly.
    """

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        # Not Response.__init__: that would add ``content-length: 0``.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", _SSE.encode())]
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _cancel_on_disconnect(receive, pump())
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()
        if self.background is not None:
            await self.background()


# --- the app ---


class _App:
    """Handlers and the state they share; ``create_app`` wires them into Starlette."""

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: VllmMetrics | None,
        kv_sources: dict[str, Any] | None,
        settings: ServerSettings,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.kv_sources = kv_sources
        self.settings = settings
        self.state = _State()
        cfg = engine.config
        self.served = cfg.model_name
        self.block_size = cfg.block_size
        self.ctx = ModelContext(
            served_model=cfg.model_name,
            tokenizer=engine.tokenizer,
            max_model_len=cfg.max_model_len,
            aliases=settings.served_model_aliases,
        )
        if metrics is not None:
            self._wire_metrics(metrics)

    def _wire_metrics(self, metrics: VllmMetrics) -> None:
        engine = self.engine
        prev_step = engine.on_step
        params = self.state.params

        def on_step(step: Any) -> None:
            metrics.observe_step(step)
            if prev_step is not None:
                prev_step(step)

        def on_finished(stats: Any) -> None:
            max_tokens, n = params.pop(stats.request_id, (stats.max_tokens, 1))
            metrics.observe_finished(stats, max_tokens_param=max_tokens, n_param=n)

        engine.on_step = on_step
        engine.on_finished = on_finished

    def model_context(self) -> ModelContext:
        self.ctx.loras = self.engine.loras().keys()
        return self.ctx

    # ---- simple endpoints ----------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return _json(dumps({"version": self.settings.version}).encode())

    async def load(self, request: Request) -> Response:
        load = self.state.in_flight if self.settings.server_load_tracking else 0
        return _json(dumps({"server_load": load}).encode())

    async def kv_event_sources(self, request: Request) -> Response:
        return _json(dumps(self.kv_sources or {}).encode())

    def _card(self, name: str, root: str, parent: str | None, max_len: int | None) -> Any:
        now = int(time.time())
        return {
            "id": name,
            "object": "model",
            "created": now,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": max_len,
            "permission": [
                {
                    "id": f"modelperm-{random.getrandbits(64):016x}",
                    "object": "model_permission",
                    "created": now,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    async def models(self, request: Request) -> Response:
        max_len = self.engine.config.max_model_len
        root = self.settings.model_path
        cards = [self._card(self.served, root, None, max_len)]
        cards += [self._card(a, root, None, max_len) for a in self.settings.served_model_aliases]
        cards += [self._card(n, p, self.served, None) for n, p in self.engine.loras().items()]
        return _json(dumps({"object": "list", "data": cards}).encode())

    async def metrics_endpoint(self, request: Request) -> Response:
        if self.metrics is None:
            return _detail(404, "Not Found")
        now = time.time()
        self.metrics.update(self.engine.stats(), now)
        for i, (power, clock, util) in enumerate(self.engine.gpu_telemetry()):
            self.metrics.observe_gpu(i, power, clock, util)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def reset_prefix_cache(self, request: Request) -> Response:
        ok = self.engine.reset_prefix_cache()
        return _json(dumps({"success": bool(ok)}).encode())

    # ---- tokenizer endpoints ---------------------------------------------------------------

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            req = parse_tokenize(body, request.headers.get("content-type"), self.model_context())
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        strs = self.engine.tokenizer.token_strs(req.tokens) if req.return_token_strs else None
        return _json(
            dumps(
                {
                    "count": len(req.tokens),
                    "max_model_len": self.engine.config.max_model_len,
                    "tokens": req.tokens,
                    "token_strs": strs,
                }
            ).encode()
        )

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            req = parse_detokenize(body, request.headers.get("content-type"), self.model_context())
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        # The golden tokenizer has no decoder: detokenized text is the tokens joined by spaces.
        text = " ".join(self.engine.tokenizer.token_strs(req.tokens))
        return _json(dumps({"prompt": text}).encode())

    # ---- LoRA ------------------------------------------------------------------------------

    async def load_lora(self, request: Request) -> Response:
        from shoal.sim.lora import LoraError

        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            req = parse_load_lora(body, request.headers.get("content-type"))
            self.engine.add_lora(req.lora_name, req.lora_path)
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        except LoraError as exc:
            return _error(OpenAIError(exc.status, exc.message, exc.err_type, None))
        # vLLM answers a plain-text body without a content-type.
        text = f"Success: LoRA adapter '{req.lora_name}' added successfully."
        return Response(text.encode(), status_code=200)

    async def unload_lora(self, request: Request) -> Response:
        from shoal.sim.lora import LoraError

        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            req = parse_unload_lora(body, request.headers.get("content-type"))
            self.engine.remove_lora(req.lora_name)
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        except LoraError as exc:
            return _error(OpenAIError(exc.status, exc.message, exc.err_type, None))
        text = f"Success: LoRA adapter '{req.lora_name}' removed successfully."
        return Response(text.encode(), status_code=200)

    # ---- inference -------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    def _maybe_fail(self) -> OpenAIError | None:
        rate = self.state.faults.error_rate
        if rate > 0 and random.random() < rate:
            return _internal_error("Simulated engine failure (injected through /admin/faults).")
        return None

    def _engine_requests(self, req: GenerateRequest, rid: str) -> list[EngineRequest]:
        """One engine request per (prompt, choice); choice ``j`` of prompt ``i`` is index i*n+j."""
        out: list[EngineRequest] = []
        base_seed = req.seed or 0
        for i, prompt in enumerate(req.prompts):
            for j in range(req.n):
                index = i * req.n + j
                params = SamplingParams(
                    max_tokens=req.max_tokens[i],
                    min_tokens=req.min_tokens,
                    ignore_eos=req.ignore_eos,
                    stop=req.stop,
                    # Distinct seeds make the n choices differ, as sampling does in vLLM.
                    seed=(base_seed + j) & 0xFFFFFFFF,
                )
                out.append(
                    EngineRequest(
                        request_id=f"{rid}-{index}",
                        prompt_token_ids=prompt,
                        params=params,
                        lora_name=req.lora_name,
                        priority=req.priority,
                    )
                )
        return out

    def _track(self, ereqs: list[EngineRequest], n: int) -> None:
        if self.metrics is not None:
            for er in ereqs:
                self.state.params[er.request_id] = (er.params.max_tokens, n)

    def _untrack(self, ereqs: list[EngineRequest]) -> None:
        if self.metrics is not None:
            for er in ereqs:
                self.state.params.pop(er.request_id, None)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            ctype = request.headers.get("content-type")
            ctx = self.model_context()
            req = parse_chat(body, ctype, ctx) if chat else parse_completion(body, ctype, ctx)
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        failure = self._maybe_fail()
        if failure is not None:
            return self._after(_error(failure))
        rid = chat_id() if chat else completion_id()
        created = int(time.time())
        ereqs = self._engine_requests(req, rid)
        self._track(ereqs, req.n)
        self.state.in_flight += 1
        if req.stream:
            events = self._stream(req, ereqs, rid, created, chat=chat)

            def done() -> None:
                self.state.in_flight -= 1
                self._untrack(ereqs)

            return self._after(_SseResponse(events, done))
        try:
            result = await _cancel_on_disconnect(
                request.receive, self._collect(req, ereqs, rid, created, chat=chat)
            )
        except OpenAIError as exc:
            return self._after(_error(exc))
        finally:
            self.state.in_flight -= 1
            self._untrack(ereqs)
        if result is None:  # client gone; nobody reads this
            return Response(status_code=499)
        return self._after(_json(result))

    def _after(self, response: Response) -> Response:
        """Attach the crash fault: exit right after this response went out."""
        if self.state.faults.crash:
            log.error("crash fault set through /admin/faults: exiting after this response")
            response.background = BackgroundTask(_crash)
        return response

    async def _submit(self, er: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """The engine's output stream; its refusal of a request becomes a 400."""
        gen = self.engine.generate(er)
        try:
            async for out in gen:
                yield out
        except ValueError as exc:
            raise OpenAIError(400, str(exc), "BadRequestError", None) from None
        finally:
            # Closing the engine's generator is what aborts an unfinished request.
            await gen.aclose()  # type: ignore[attr-defined]

    async def _collect(
        self,
        req: GenerateRequest,
        ereqs: list[EngineRequest],
        rid: str,
        created: int,
        *,
        chat: bool,
    ) -> bytes:
        async def one(er: EngineRequest) -> tuple[str, list[int], RequestOutput | None, int]:
            text: list[str] = []
            ids: list[int] = []
            last: RequestOutput | None = None
            cached = -1
            async for out in self._submit(er):
                if cached < 0:
                    cached = out.num_cached_tokens
                text.append(out.new_text)
                ids.extend(out.new_token_ids)
                last = out
            return "".join(text), ids, last, max(cached, 0)

        if len(ereqs) == 1:
            results = [await one(ereqs[0])]
        else:
            results = list(await asyncio.gather(*(one(er) for er in ereqs)))
        tok = self.engine.tokenizer
        choices: list[Choice] = []
        completion_tokens = 0
        for index, (text, ids, last, _) in enumerate(results):
            completion_tokens += len(ids)
            prompt = req.prompts[index // req.n]
            logprobs = None
            if req.logprobs is not None:
                logprobs = (
                    chat_logprobs(tok, ids, req.logprobs)
                    if chat
                    else completion_logprobs(tok, ids, req.logprobs, 0)
                )
            choices.append(
                Choice(
                    index=index,
                    text=text,
                    finish_reason=_reason(last),
                    stop_reason=last.stop_reason if last is not None else None,
                    token_ids=ids if req.return_token_ids else None,
                    prompt_token_ids=prompt if req.return_token_ids and not chat else None,
                    logprobs=logprobs,
                )
            )
        usage = self._usage(req, completion_tokens, [r[3] for r in results])
        if chat:
            return chat_body(
                rid=rid,
                created=created,
                model=req.model,
                choices=choices,
                usage=usage,
                prompt_token_ids=req.prompts[0] if req.return_token_ids else None,
                fingerprint=self.settings.system_fingerprint,
            )
        return completion_body(
            rid=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=usage,
            fingerprint=self.settings.system_fingerprint,
        )

    def _usage(self, req: GenerateRequest, completion_tokens: int, cached: list[int]) -> Usage:
        prompt_tokens = sum(len(p) for p in req.prompts)
        usage = Usage(prompt_tokens, completion_tokens)
        if self.settings.enable_prompt_tokens_details:
            # Prompts are counted once, so are their cache hits: the first choice's.
            hit = sum(cached[i * req.n] for i in range(len(req.prompts)) if i * req.n < len(cached))
            usage.cached_tokens = hit
            usage.created_cache_tokens = sum(
                created_cache_tokens(len(p), cached[i * req.n], self.block_size)
                for i, p in enumerate(req.prompts)
                if i * req.n < len(cached)
            )
        return usage

    async def _stream(
        self,
        req: GenerateRequest,
        ereqs: list[EngineRequest],
        rid: str,
        created: int,
        *,
        chat: bool,
    ) -> AsyncGenerator[bytes, None]:
        fmt = StreamFormatter(
            chat=chat,
            rid=rid,
            created=created,
            model=req.model,
            fingerprint=self.settings.system_fingerprint,
        )
        tok = self.engine.tokenizer
        total = len(ereqs)
        if chat:
            for index in range(total):
                yield fmt.role(index, req.prompts[0] if req.return_token_ids else None)
        completion = [0] * total
        cached = [0] * total
        seen = [False] * total
        text_pos = [0] * total
        finished = 0
        outputs = _merged(self._submit, ereqs)
        try:
            async for index, out in outputs:
                if not seen[index]:
                    seen[index] = True
                    cached[index] = out.num_cached_tokens
                completion[index] += len(out.new_token_ids)
                prompt = req.prompts[index // req.n]
                usage = None
                if req.continuous_usage:
                    usage = Usage(len(prompt), completion[index])
                if out.finished:
                    finished += 1
                last = finished == total and not req.include_usage
                plain = not out.finished and req.logprobs is None and not req.return_token_ids
                if plain:
                    if not out.new_text:
                        continue  # text held back for a possible stop string
                    yield fmt.token(index, out.new_text, usage)
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = (
                        chat_logprobs(tok, out.new_token_ids, req.logprobs)
                        if chat
                        else completion_logprobs(
                            tok, out.new_token_ids, req.logprobs, text_pos[index]
                        )
                    )
                    text_pos[index] += sum(len(s) for s in tok.token_strs(out.new_token_ids))
                first_ids = req.return_token_ids and completion[index] == len(out.new_token_ids)
                yield fmt.chunk(
                    index,
                    out.new_text,
                    finish_reason=_reason(out) if out.finished else None,
                    stop_reason=out.stop_reason if out.finished else None,
                    token_ids=list(out.new_token_ids) if req.return_token_ids else None,
                    prompt_token_ids=prompt if first_ids and not chat else None,
                    logprobs=logprobs,
                    usage=usage,
                    last=last,
                )
        except OpenAIError as exc:
            # Mid-stream failures are an error event, as vLLM sends them.
            yield b"data: " + exc.body() + b"\n\n"
            yield DONE_EVENT
            return
        finally:
            await outputs.aclose()
        if req.include_usage:
            yield fmt.usage(self._usage(req, sum(completion), cached))
        yield DONE_EVENT

    # ---- admin -------------------------------------------------------------------------------

    async def admin_faults(self, request: Request) -> Response:
        try:
            value = decode_json_body(await _read_body(request, 65536), _JSON)
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        if not isinstance(value, dict):
            return _error(OpenAIError(400, "expected a JSON object", "BadRequestError"))
        faults = self.state.faults
        try:
            if "error_rate" in value:
                rate = float(value["error_rate"])
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"error_rate must be within [0, 1], got {rate}")
                faults.error_rate = rate
            stall = value.get("stall_seconds")
            slowdown = value.get("slowdown")
            if stall is not None:
                faults.stall_seconds = max(0.0, float(stall))
            if slowdown is not None:
                faults.slowdown = float(slowdown)
            self.engine.set_faults(
                stall_seconds=None if stall is None else float(stall),
                slowdown=None if slowdown is None else float(slowdown),
            )
            if "crash" in value:
                faults.crash = bool(value["crash"])
        except (TypeError, ValueError) as exc:
            return _error(OpenAIError(400, str(exc), "BadRequestError"))
        return self._after(_json(dumps(asdict(faults)).encode()))

    async def admin_gpu(self, request: Request) -> Response:
        try:
            value = decode_json_body(await _read_body(request, 65536), _JSON)
        except (OpenAIError, FastApiHttpError) as exc:
            return _error(exc)
        if not isinstance(value, dict):
            return _error(OpenAIError(400, "expected a JSON object", "BadRequestError"))
        try:
            clock = value.get("clock_lock_mhz")
            cap = value.get("power_cap_watts")
            self.engine.set_gpu_limits(
                clock_lock_mhz=None if clock is None else float(clock),
                power_cap_watts=None if cap is None else float(cap),
            )
        except (TypeError, ValueError) as exc:
            return _error(OpenAIError(400, str(exc), "BadRequestError"))
        return _json(dumps(self._gpu_state()).encode())

    def _gpu_state(self) -> dict[str, Any]:
        limits = self.engine.gpu_limits()
        telemetry = [
            {"power_watts": p, "sm_clock_mhz": c, "utilization_pct": u}
            for p, c, u in self.engine.gpu_telemetry()
        ]
        return {**limits, "gpus": telemetry}

    async def admin_state(self, request: Request) -> Response:
        stats = asdict(self.engine.stats())
        state = {
            "faults": asdict(self.state.faults),
            "gpu": self._gpu_state(),
            "engine": stats,
            "loras": self.engine.loras(),
            "in_flight": self.state.in_flight,
        }
        drift = getattr(self.engine, "drift", None)
        if drift is not None:
            state["drift"] = {
                "steps": drift.steps,
                "modelled_s": drift.modelled_s,
                "actual_s": drift.actual_s,
                "relative": drift.relative,
            }
        return _json(dumps(state).encode())

    # ---- SGLang-router compatibility -------------------------------------------------------

    def _server_info(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {
            "model_path": self.settings.model_path,
            "tokenizer_path": self.settings.model_path,
            "served_model_name": self.served,
            "model_id": self.served,
            "dp_size": 1,
            "tp_size": cfg.num_gpus,
            "page_size": cfg.block_size,
            "context_length": cfg.max_model_len,
            "max_total_num_tokens": cfg.num_gpu_blocks * cfg.block_size,
            "max_running_requests": cfg.max_num_seqs,
            "max_prefill_tokens": cfg.max_num_batched_tokens,
            "is_embedding": False,
            "version": self.settings.version,
        }

    async def server_info(self, request: Request) -> Response:
        return _json(dumps(self._server_info()).encode())

    async def model_info(self, request: Request) -> Response:
        info = {
            "model_path": self.settings.model_path,
            "tokenizer_path": self.settings.model_path,
            "served_model_name": self.served,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "max_context_length": self.engine.config.max_model_len,
        }
        return _json(dumps(info).encode())

    async def get_load(self, request: Request) -> Response:
        stats = self.engine.stats()
        load = [
            {
                "dp_rank": 0,
                "num_reqs": stats.num_running + stats.num_waiting,
                "num_waiting_reqs": stats.num_waiting,
                "num_tokens": int(
                    stats.kv_cache_usage
                    * self.engine.config.num_gpu_blocks
                    * self.engine.config.block_size
                ),
            }
        ]
        return _json(dumps(load).encode())


def _reason(out: RequestOutput | None) -> str | None:
    if out is None or out.finish_reason is None:
        return None
    reason = out.finish_reason
    return reason.value if isinstance(reason, FinishReason) else str(reason)


def _crash() -> None:
    os._exit(1)


async def _merged(
    submit: Callable[[EngineRequest], AsyncGenerator[RequestOutput, None]],
    ereqs: list[EngineRequest],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several engine requests in arrival order, tagged with their choice index."""
    if len(ereqs) == 1:
        source = submit(ereqs[0])
        try:
            async for out in source:
                yield 0, out
        finally:
            await source.aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, er: EngineRequest) -> None:
        try:
            async for out in submit(er):
                queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, er)) for i, er in enumerate(ereqs)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- middleware: headers every response carries, HTTP metrics ---


class _CommonHeaders:
    """Adds ``vary: Origin`` to every response and reports each one to the HTTP metrics."""

    def __init__(
        self, app: ASGIApp, metrics: VllmMetrics | None, routes: frozenset[tuple[str, str]]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        start = time.perf_counter()
        status = 500
        response_bytes = 0

        async def wrapped_send(message: Message) -> None:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), (b"vary", b"Origin")]
                message["headers"] = headers
                if metrics is not None:
                    for name, value in headers:
                        if name == b"content-length" and value.isdigit():
                            response_bytes = int(value)
            await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            if metrics is not None:
                self._observe(metrics, scope, status, time.perf_counter() - start, response_bytes)

    def _observe(
        self, metrics: VllmMetrics, scope: Scope, status: int, duration: float, sent: int
    ) -> None:
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        # The instrumentator labels by matched route; a wrong method matches none.
        handler = path if (method, path) in self.routes else "none"
        request_bytes = 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                request_bytes = int(value)
        try:
            metrics.observe_http(method, handler, status, duration, request_bytes, sent, path=path)
        except Exception:  # metrics must never break serving
            log.exception("observe_http failed")


async def _not_found(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return _detail(405, "Method Not Allowed", headers=dict(exc.headers or {}))
    if isinstance(exc, HTTPException) and exc.status_code != 404:
        return _detail(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    return _detail(404, "Not Found")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error serving %s", request.url.path, exc_info=exc)
    return _error(_internal_error(f"Internal server error: {type(exc).__name__}"))


Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    engine: AsyncEngine,
    metrics: VllmMetrics | None,
    kv_sources: dict[str, Any] | None,
    settings: ServerSettings,
) -> Starlette:
    """The simulator's ASGI app; the caller runs ``engine.start()`` (the lifespan does too)."""
    app_ = _App(engine, metrics, kv_sources, settings)

    def route(path: str, endpoint: Handler, methods: list[str]) -> Route:
        # FastAPI answers GET routes without an implicit HEAD; so does this.
        r = Route(path, endpoint, methods=methods)
        r.methods = set(methods)
        return r

    routes = [
        route("/health", app_.health, ["GET"]),
        route("/ping", app_.health, ["GET", "POST"]),
        route("/version", app_.version, ["GET"]),
        route("/load", app_.load, ["GET"]),
        route("/kv_event_sources", app_.kv_event_sources, ["GET"]),
        route("/metrics", app_.metrics_endpoint, ["GET"]),
        route("/v1/models", app_.models, ["GET"]),
        route("/tokenize", app_.tokenize, ["POST"]),
        route("/detokenize", app_.detokenize, ["POST"]),
        route("/v1/completions", app_.completions, ["POST"]),
        route("/v1/chat/completions", app_.chat_completions, ["POST"]),
    ]
    if settings.runtime_lora_updating:
        routes += [
            route("/v1/load_lora_adapter", app_.load_lora, ["POST"]),
            route("/v1/unload_lora_adapter", app_.unload_lora, ["POST"]),
        ]
    if settings.dev_mode:
        routes.append(route("/reset_prefix_cache", app_.reset_prefix_cache, ["POST"]))
    if settings.router_compat:
        # What SGLang's router (sgl-model-gateway) and vLLM's router probe on a worker: /health
        # (served anyway), /get_server_info (metadata, dp_size), /get_model_info, /get_load
        # (load-aware policies) and /health_generate; newer SGLang names without ``get_``.
        routes += [
            route("/get_server_info", app_.server_info, ["GET"]),
            route("/server_info", app_.server_info, ["GET"]),
            route("/get_model_info", app_.model_info, ["GET"]),
            route("/model_info", app_.model_info, ["GET"]),
            route("/get_load", app_.get_load, ["GET"]),
            route("/health_generate", app_.health, ["GET"]),
        ]
    if settings.admin_api:
        routes += [
            route("/admin/faults", app_.admin_faults, ["POST"]),
            route("/admin/gpu", app_.admin_gpu, ["POST"]),
            route("/admin/state", app_.admin_state, ["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: _not_found,
            404: _not_found,
            405: _not_found,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    pairs = frozenset((m, r.path) for r in routes for m in (r.methods or ()))
    app.add_middleware(_CommonHeaders, metrics=metrics, routes=pairs)
    app.state.sim = app_
    return app
