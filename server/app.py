"""The FastAPI app: OpenAI routes over vLLM's serving classes, with our own errors and extras.

vLLM's ``OpenAIServingChat``/``OpenAIServingCompletion`` turn a validated request into engine
calls and OpenAI responses (chat template, sampling params, logprobs, usage, SSE chunks), so the
wire format is vLLM's, tested upstream. What is ours: one error shape for every failure, the API
key, disconnects that abort the engine request, ``/health``, and ``/metrics`` with MoD gauges.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
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
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.v1.engine.async_llm import AsyncLLM

from .metrics import render_metrics


class APIError(Exception):
    """An error we raise ourselves; rendered like every other error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# OpenAI's own codes for the two errors clients branch on; others carry null.
_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    err_type = "invalid_request_error" if status < 500 else "server_error"
    if status == 503:
        err_type = "service_unavailable_error"
    body = {"message": message, "type": err_type, "param": param, "code": code or _CODES.get(status)}
    return JSONResponse({"error": body}, status_code=status)


def from_vllm(err: ErrorResponse) -> JSONResponse:
    return error_json(err.error.code, err.error.message, err.error.param)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('ctx', {}).get('error', 'could not parse')}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    return (f"{param}: {msg}" if param else msg), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_json(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_json(400, *_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_json(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception):
        # vLLM's own mapping: its validation errors and ValueError/TypeError -> 400, else 500.
        return from_vllm(create_error_response(exc))


async def check_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').")


MAX_N = 128  # OpenAI's limit; also keeps one request from occupying the engine for minutes


def _check_n(n: int | None) -> None:
    if n is not None and n > MAX_N:
        raise APIError(400, f"n must be at most {MAX_N}, got {n}", param="n")


SHUTTING_DOWN = {"error": {"message": "server shutting down", "type": "server_error", "param": None, "code": 503}}


async def _respond(result, stream: bool, state):
    """Turn what a vLLM serving call returned into a response.

    A stream is peeked at before the 200 goes out, so that an error found when the engine
    takes the request (it is found there for some inputs) still gets its proper status. On
    SIGTERM/SIGINT (``state.shutting_down``) a stream ends at its next chunk with an error event,
    which aborts it in the engine and lets uvicorn's graceful shutdown finish at once.
    """
    if isinstance(result, ErrorResponse):
        return from_vllm(result)
    if not stream:
        return JSONResponse(result.model_dump())
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
        async for chunk in result:  # a disconnect cancels this, which aborts the engine request
            if state.shutting_down:
                await result.aclose()  # aborts the request in the engine
                yield f"data: {json.dumps(SHUTTING_DOWN)}\n\ndata: [DONE]\n\n"
                return
            yield chunk

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
            )
            app.state.completion = OpenAIServingCompletion(
                engine, models, online_renderer=renderer, request_logger=None
            )
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="mod-serve", lifespan=lifespan)
    app.state.api_key = api_key
    app.state.shutting_down = False  # set by the CLI's signal handler
    _install_error_handlers(app)
    auth = [Depends(check_api_key)]

    @app.get("/health")
    async def health(request: Request):
        try:
            await asyncio.wait_for(request.app.state.engine.check_health(), 10)
        except Exception as e:  # dead engine or not answering: not ready
            return error_json(503, f"engine not healthy: {e}")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request):
        body, content_type = await render_metrics(request.app.state.engine)
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    async def list_models(request: Request):
        return JSONResponse((await request.app.state.models.show_available_models()).model_dump())

    @app.post("/v1/chat/completions", dependencies=auth)
    @with_cancellation  # a client gone before a non-streamed answer cancels it (and aborts)
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        _check_n(request.n)
        result = await raw_request.app.state.chat.create_chat_completion(request, raw_request)
        return await _respond(result, bool(request.stream), raw_request.app.state)

    @app.post("/v1/completions", dependencies=auth)
    @with_cancellation
    async def completions(request: CompletionRequest, raw_request: Request):
        _check_n(request.n)
        result = await raw_request.app.state.completion.create_completion(request, raw_request)
        return await _respond(result, bool(request.stream), raw_request.app.state)

    return app

