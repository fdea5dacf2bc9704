"""The FastAPI app: OpenAI routes over vLLM's serving classes, with our own errors and extras.

vLLM's ``OpenAIServingChat``/``OpenAIServingCompletion`` turn a validated request into engine
calls and OpenAI responses (chat template, sampling params, logprobs, usage, SSE chunks), so the
wire format is vLLM's, tested upstream. What is ours: one error shape for every failure, the API
key, disconnects that abort the engine request, draining on shutdown, ``/health``, and
``/metrics`` with MoD gauges and HTTP counters.

Errors. FastAPI's own errors (validation, malformed JSON, HTTP errors) and ours (``APIError``)
have exception handlers, which Starlette runs in its ExceptionMiddleware. Everything else that a
route raises (vLLM's request checks, the engine's admission, the chat template, real faults) is
caught by ``ServingMiddleware``, which sits just inside Starlette's ServerErrorMiddleware, and
mapped with vLLM's own ``create_error_response`` (client errors -> 4xx, queue full -> 503, the
rest -> 500). It answers instead of re-raising, so no exception reaches ServerErrorMiddleware:
that one re-raises after responding (by design), and uvicorn then logs a traceback and closes
the connection, which cost keep-alive clients their next request (issue 12). The middleware also
writes the access log (one line per request, the error message on the line, a traceback only
for a 5xx), counts responses and aborted requests, and implements the drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import with_cancellation
from vllm.exceptions import VLLMError
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.v1.engine.async_llm import AsyncLLM

from .metrics import HttpCounters, render_metrics
from .routing_report import RoutingReport, move_threshold

log = logging.getLogger("mod_serve.http")

RETRY_AFTER_S = 1  # on every 503: queue full (backpressure) or draining


class APIError(Exception):
    """An error we raise ourselves; rendered like every other error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# OpenAI's own codes for the two errors clients branch on; others carry null.
_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    err_type = "invalid_request_error" if status < 500 else "server_error"
    if status == 503:
        err_type = "service_unavailable_error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": code or _CODES.get(status)}}


def error_json(
    status: int, message: str, param: str | None = None, code: str | None = None, close: bool = False
) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_vllm(err: ErrorResponse) -> JSONResponse:
    return error_json(err.error.code, err.error.message, err.error.param)


def classify(exc: BaseException) -> tuple[int, str, str | None]:
    """(status, message, param) for an exception a route raised: vLLM's own mapping
    (its client errors, ValueError/TypeError/OverflowError, jinja template errors -> 400,
    queue full -> 503, NotImplementedError -> 501, anything else -> 500)."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return classify(exc.exceptions[0])
    if not isinstance(exc, Exception):
        return 500, f"{type(exc).__name__}: {exc}", None
    err = create_error_response(exc).error
    message = err.message or type(exc).__name__
    if err.code == 500:  # a fault: the details go to the log, not to the client
        message = f"Internal server error ({type(exc).__name__})"
    return int(err.code), message, err.param


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('ctx', {}).get('error', 'could not parse')}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    return (f"{param}: {msg}" if param else msg), param


def _install_error_handlers(app: FastAPI) -> None:
    """Handlers for specific types only: Starlette runs those in its ExceptionMiddleware and
    does not re-raise. There is deliberately no handler for ``Exception``: Starlette would run
    it in ServerErrorMiddleware, which re-raises (see the module docstring)."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_json(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_json(400, *_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail))


class QuietClientErrors(logging.Filter):
    """vLLM logs a few user mistakes itself: with a traceback when a stream's first step fails
    (an out-of-vocabulary token id, say: ``Error in completion stream generator``), at ERROR for
    an unknown model, at WARNING when the chat template rejects the messages. The client gets a
    4xx and the access log a line with the reason, so those records are dropped here; records
    of real faults (exceptions that map to 5xx) pass."""

    USER_ERRORS = ("Error with model", "Chat template rejected the request")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return classify(exc)[0] == 500
        return not str(record.msg).startswith(self.USER_ERRORS)


QUIET_LOGGERS = (
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.renderers.hf",
)


def quiet_vllm_client_errors() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietClientErrors) for f in logger.filters):
            logger.addFilter(QuietClientErrors())


_DISCONNECT = {"type": "http.disconnect"}


class Exchange:
    """One HTTP request as ``ServingMiddleware`` sees it: what was sent, whether the client left,
    and an abort switch that makes the app believe the client left (vLLM then aborts the engine
    request, exactly as for a real disconnect)."""

    def __init__(self, scope, receive, send):
        self.scope, self._receive, self._send = scope, receive, send
        self.started = self.complete = self.sse = self.client_gone = self.gone_before_start = False
        self.status: int | None = None
        self.error_message: str | None = None
        self.abort_reason: str | None = None
        self._abort = asyncio.Event()
        self._error_body = bytearray()
        self.t0 = time.monotonic()

    def abort(self, reason: str) -> None:
        if not self.complete and self.abort_reason is None:
            self.abort_reason = reason
            self._abort.set()

    async def receive(self):
        if self._abort.is_set():
            return _DISCONNECT
        got = asyncio.ensure_future(self._receive())
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({got, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (got, aborted):
                if not task.done():
                    task.cancel()
        if not got.done() or got.cancelled():
            return _DISCONNECT  # aborted
        message = got.result()
        if message["type"] == "http.disconnect" and not self.complete and not self.client_gone:
            self.client_gone, self.gone_before_start = True, not self.started
        return message

    async def send(self, message) -> None:
        if self._abort.is_set() and (not self.started or self.sse):
            return  # the app was told the client left; the middleware ends the response
        kind = message["type"]
        if kind == "http.response.start":
            self.started, self.status = True, message["status"]
            headers = dict(message.get("headers", []))
            self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif kind == "http.response.body":
            if self.status and self.status >= 400 and len(self._error_body) < 8192:
                self._error_body += message.get("body", b"")
            if not message.get("more_body", False):
                self.complete = True
        await self._send(message)

    async def send_error(self, status: int, message: str, param: str | None = None, close: bool = False):
        response = error_json(status, message, param, close=close)
        self.error_message = message
        await response(self.scope, self.receive, self.send_raw)

    async def send_raw(self, message) -> None:
        """Sends that bypass the abort switch (the middleware's own)."""
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        elif not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def end_stream_with_error(self, status: int, message: str) -> None:
        """An SSE response already under way: an error event, ``[DONE]``, and a proper end."""
        self.error_message = message
        event = error_body(status, message)
        event["error"]["code"] = status  # in-stream errors carry the status, as vLLM's own do
        body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        await self.send_raw({"type": "http.response.body", "body": body, "more_body": False})

    def logged_error(self) -> str | None:
        if self.error_message is None and self._error_body:
            try:
                self.error_message = json.loads(bytes(self._error_body))["error"]["message"]
            except Exception:
                self.error_message = bytes(self._error_body[:200]).decode(errors="replace")
        return self.error_message


class Serving:
    """Shared state of the HTTP side: in-flight API requests, draining, counters."""

    def __init__(self):
        self.inflight: set[Exchange] = set()
        self.draining = False
        self.counters = HttpCounters()

    def start_drain(self) -> None:
        self.draining = True

    def abort_all(self, reason: str = "shutdown") -> int:
        live = [ex for ex in self.inflight if not ex.complete]
        for ex in live:
            ex.abort(reason)
        return len(live)


SHUTTING_DOWN = "server shutting down"


def _oneline(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ServingMiddleware:
    """Pure ASGI middleware (Starlette places user middleware between its ServerErrorMiddleware
    and its ExceptionMiddleware): error mapping, access log, counters, drain, aborts."""

    def __init__(self, app, serving: Serving):
        self.app, self.serving = app, serving

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ex = Exchange(scope, receive, send)
        api = scope["path"].startswith("/v1/")
        serving = self.serving
        exc: BaseException | None = None
        try:
            if serving.draining and (api or scope["path"] == "/health"):
                # not ready any more: load balancers move away, clients retry elsewhere
                await ex.send_error(503, f"{SHUTTING_DOWN}: not accepting new requests", close=True)
                return
            if api:
                serving.inflight.add(ex)
            try:
                await self.app(scope, ex.receive, ex.send)
            except Exception as e:  # noqa: BLE001 - every error becomes a response
                exc = e
            await self._finish(ex, exc)
        finally:
            serving.inflight.discard(ex)
            self._account(ex, exc)

    async def _finish(self, ex: Exchange, exc: BaseException | None) -> None:
        if ex.abort_reason is not None:  # drain timeout: the app saw a "disconnect"
            if not ex.started:
                await ex.send_error(503, f"{SHUTTING_DOWN}: request aborted at the drain timeout", close=True)
            elif ex.sse and not ex.complete:
                await ex.end_stream_with_error(503, SHUTTING_DOWN)
            return
        if exc is None or ex.client_gone or isinstance(exc, ClientDisconnect):
            return
        status, message, param = classify(exc)
        if not ex.started:
            await ex.send_error(status, message, param)
        elif ex.sse and not ex.complete:
            await ex.end_stream_with_error(status, message)
        # (a non-streamed response that failed half-sent: nothing valid can follow; uvicorn
        # closes the connection)

    def _account(self, ex: Exchange, exc: BaseException | None) -> None:
        scope = ex.scope
        client = scope.get("client") or ("-", 0)
        took = time.monotonic() - ex.t0
        where = f'{client[0]}:{client[1]} "{scope["method"]} {scope["path"]}"'
        counters = self.serving.counters
        if ex.status is not None and not ex.gone_before_start:  # a status line the client got
            counters.response(ex.status)
        if ex.abort_reason is not None or ex.client_gone:  # (gone before the response was complete)
            reason = ex.abort_reason or "client_disconnect"
            counters.aborted(reason)
            log.info("%s aborted (%s) after %.2f s", where, reason.replace("_", " "), took)
            return
        status = ex.status or 0
        if exc is not None and classify(exc)[0] == 500:  # a real fault: the one traceback
            log.error("%s %d in %.2f s: %s", where, status, took, _oneline(repr(exc)), exc_info=exc)
        elif status == 500:
            log.error("%s %d in %.2f s: %s", where, status, took, _oneline(ex.logged_error() or ""))
        elif status >= 400:  # the client's mistake, or 503 (queue full, draining), 501: expected
            log.warning("%s %d in %.2f s: %s", where, status, took, _oneline(ex.logged_error() or ""))
        else:
            log.info("%s %d in %.2f s", where, status, took)


def harden(app: FastAPI) -> Serving:
    """Error handlers, ``ServingMiddleware`` and its state (``app.state.serving``, through which
    the CLI's signal handling drains)."""
    app.state.serving = serving = Serving()
    app.add_middleware(ServingMiddleware, serving=serving)
    _install_error_handlers(app)
    return serving


async def check_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').")


def _checked(model_cls):
    """``model_cls`` whose validation turns any exception into a validation error (-> 400).

    Some of vLLM's request validators (``mode="before"``) assume types that pydantic has not
    checked yet, so a body like ``{"structured_outputs": []}`` raises AttributeError or KeyError
    inside validation, which pydantic passes on as is: that was a 500 for a malformed request.
    A wrap validator on a subclass runs outside all of the parent's validators."""

    class Checked(model_cls):
        @model_validator(mode="wrap")
        @classmethod
        def _malformed_is_a_validation_error(cls, data, handler):
            try:
                return handler(data)
            except (ValueError, AssertionError, VLLMError):  # pydantic's ValidationError included
                raise
            except Exception as e:
                raise ValueError(f"malformed request ({type(e).__name__}: {e})") from e

    Checked.__name__ = Checked.__qualname__ = model_cls.__name__
    return Checked


ChatRequest = _checked(ChatCompletionRequest)
CompletionsRequest = _checked(CompletionRequest)

MAX_N = 128  # OpenAI's limit; also keeps one request from occupying the engine for minutes
MAX_LOGIT_BIAS = 100.0  # OpenAI's range; vLLM itself takes any float, NaN and inf included


def _check_request(request: ChatCompletionRequest | CompletionRequest, is_mod: bool) -> None:
    """Our checks on top of vLLM's (and the per-request threshold handed to the engine)."""
    try:
        move_threshold(request, is_mod)
    except ValueError as e:
        raise APIError(400, str(e), param="mod_threshold") from None
    if request.n is not None and request.n > MAX_N:
        raise APIError(400, f"n must be at most {MAX_N}, got {request.n}", param="n")
    for token, bias in (request.logit_bias or {}).items():
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # also false for NaN
            raise APIError(
                400,
                f"logit_bias values must be numbers in [-100, 100], got {bias} for token {token}",
                param="logit_bias",
            )


async def _respond(result, stream: bool, report: RoutingReport | None = None):
    """Turn what a vLLM serving call returned into a response.

    A stream is peeked at before the 200 goes out, so that an error found when the engine
    takes the request (it is found there for some inputs) still gets its proper status.
    """
    if isinstance(result, ErrorResponse):
        return from_vllm(result)
    if not stream:
        body = result.model_dump()
        return JSONResponse(report.attach(body) if report is not None else body)
    try:
        first = await anext(result)
    except StopAsyncIteration:
        first = "data: [DONE]\n\n"
    if first.startswith('data: {"error"'):
        await result.aclose()
        err = json.loads(first[len("data: ") :])["error"]
        return error_json(err.get("code", 400), err.get("message", ""), err.get("param"))

    async def chunks():
        yield first
        async for chunk in result:  # a disconnect (or the drain's abort) cancels this, which aborts the engine request
            yield report.attach_chunk(chunk) if report is not None else chunk

    return StreamingResponse(chunks(), media_type="text/event-stream")


def build_app(engine_args: AsyncEngineArgs, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts the engine (so the port opens once it is ready) and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            models = OpenAIServingModels(engine, [BaseModelPath(served_model_name, engine_args.model)])
            renderer = OnlineRenderer(
                engine.model_config,
                engine.renderer,
                request_logger=None,
                chat_template=None,
                chat_template_content_format="auto",
            )
            app.state.engine, app.state.models = engine, models
            app.state.chat = OpenAIServingChat(
                engine,
                models,
                "assistant",
                online_renderer=renderer,
                request_logger=None,
                chat_template=None,
                chat_template_content_format="auto",
                enable_prompt_tokens_details=True,  # usage.prompt_tokens_details.cached_tokens: prefix-cache hits
            )
            app.state.completion = OpenAIServingCompletion(
                engine, models, online_renderer=renderer, request_logger=None, enable_prompt_tokens_details=True
            )
            app.state.routing_report = RoutingReport(engine)
            quiet_vllm_client_errors()
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="mod-serve", lifespan=lifespan)
    app.state.api_key = api_key
    serving = harden(app)
    auth = [Depends(check_api_key)]

    @app.get("/health")
    async def health(request: Request):  # (503 while draining: ServingMiddleware)
        try:
            await asyncio.wait_for(request.app.state.engine.check_health(), 10)
        except Exception as e:  # dead engine or not answering: not ready
            return error_json(503, f"engine not healthy: {e}")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request):
        body, content_type = await render_metrics(request.app.state.engine, serving.counters)
        body += request.app.state.routing_report.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def list_models(request: Request):
        return JSONResponse((await request.app.state.models.show_available_models()).model_dump())

    @app.post("/v1/chat/completions", dependencies=auth)
    @with_cancellation  # a client gone before a non-streamed answer cancels it (and aborts)
    async def chat_completions(request: ChatRequest, raw_request: Request):
        _check_request(request, raw_request.app.state.routing_report.enabled)
        result = await raw_request.app.state.chat.create_chat_completion(request, raw_request)
        return await _respond(result, bool(request.stream), raw_request.app.state.routing_report)

    @app.post("/v1/completions", dependencies=auth)
    @with_cancellation
    async def completions(request: CompletionsRequest, raw_request: Request):
        _check_request(request, raw_request.app.state.routing_report.enabled)
        result = await raw_request.app.state.completion.create_completion(request, raw_request)
        return await _respond(result, bool(request.stream), raw_request.app.state.routing_report)

    return app
