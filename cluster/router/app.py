"""The router's FastAPI app: OpenAI-compatible completions, chat, models, health, readiness.

`create_app` needs no Ray: it takes a started `Dispatcher` and a tokenizer, so tests drive it
in-process or under a real uvicorn. Every error leaves as OpenAI's `{"error": {...}}` body,
FastAPI's 422 included (it becomes a 400 naming the parameter).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.config import PdserveConfig, RouterConfig
from cluster.router.dispatcher import Dispatcher, NoInstance, Overloaded
from cluster.router.drain import RETRY_AFTER_S, DrainGate, DrainState
from cluster.router.generation import InstanceFailed, InstanceOverloaded
from cluster.router.logprobs import TokenTexts
from cluster.router.middleware import GateMiddleware
from cluster.router.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    error_body,
    validation_error,
)
from cluster.router.responses import ChatShape, CompletionShape, ResponseShape
from cluster.router.serving import ServeJob, serve_request
from cluster.router.streams import TokenTimeout
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.tokenizer import ChatMessageError, ChatTemplateError, Tokenizer

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool]]
InstanceStats = Callable[[], Awaitable[list[dict]]]
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# Longer texts are tokenized on a worker thread: a long prompt must not stall the event loop
# that streams every other request's tokens.
_OFFLOAD_CHARS = 8192


@dataclass
class RouterContext:
    dispatcher: Dispatcher
    tokenizer: Tokenizer
    config: RouterConfig
    max_model_len: int
    model_name: str
    health: HealthCheck | None
    created: int
    token_texts: TokenTexts
    instance_stats: InstanceStats | None = None
    drain: DrainState = field(default_factory=DrainState)
    deployment: dict | None = None  # what /version describes besides the version


def create_app(
    dispatcher: Dispatcher,
    tokenizer: Tokenizer,
    *,
    max_model_len: int,
    model_name: str,
    config: RouterConfig | None = None,
    health: HealthCheck | None = None,
    instance_stats: InstanceStats | None = None,
    drain: DrainState | None = None,
    deployment: dict | None = None,
) -> FastAPI:
    """The HTTP app over a started dispatcher. `health` says whether every instance is ready
    (None: always ready); `drain`, shared with whoever shuts the server down, turns new
    generation requests away once it starts."""
    config = config or RouterConfig()
    drain = drain or DrainState()
    ctx = RouterContext(
        dispatcher,
        tokenizer,
        config,
        max_model_len,
        config.model_name or model_name,
        health,
        int(time.time()),
        TokenTexts(tokenizer),
        instance_stats,
        drain,
        deployment,
    )
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.state.router = ctx
    _add_error_handlers(app)
    _add_routes(app, ctx)
    _add_probe_routes(app, ctx)
    app.add_middleware(
        GateMiddleware,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        max_requests_per_client=config.max_requests_per_client,
    )
    app.add_middleware(DrainGate, state=drain)  # added last: outermost, counts every request
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), kind),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("router: unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def _add_routes(app: FastAPI, ctx: RouterContext) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        _check_model(ctx, body.model)
        prompt_ids = await _completion_prompt(ctx, body)
        shape = CompletionShape(_new_request_id(), ctx.model_name, body.include_usage)
        limit = (
            body.max_tokens
            if body.max_tokens is not None
            else min(_COMPLETIONS_DEFAULT_MAX_TOKENS, ctx.max_model_len - len(prompt_ids))
        )
        return await _generate(ctx, request, body, prompt_ids, ("max_tokens", limit), shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        _check_model(ctx, body.model)
        prompt_ids = await _chat_prompt(ctx, body)
        shape = ChatShape(_new_request_id(), ctx.model_name, body.include_usage)
        name, limit = body.max_tokens_param
        limit = limit if limit is not None else ctx.max_model_len - len(prompt_ids)
        return await _generate(ctx, request, body, prompt_ids, (name, limit), shape)

    @app.get("/v1/models")
    async def models() -> Response:
        model = {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "pdserve",
            "max_model_len": ctx.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [model]})


def _add_probe_routes(app: FastAPI, ctx: RouterContext) -> None:
    """Probes carry no API key: load balancers and orchestrators call them."""

    @app.get("/health")
    async def health() -> Response:
        """The router runs and every instance is ready."""
        ready = await _instances_ready(ctx)
        status = 200 if ready else 503
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=status)

    @app.get("/ready")
    async def ready() -> Response:
        """Healthy and able to take a request now (`max_inflight_requests` not reached): what a
        load balancer should route on. False for good once a drain started."""
        if ctx.drain.draining:
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            return JSONResponse({"status": "draining"}, status_code=503, headers=headers)
        if not await _instances_ready(ctx):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if ctx.dispatcher.num_inflight >= ctx.config.max_inflight_requests:
            return JSONResponse(
                {"status": "saturated"}, status_code=503, headers={"Retry-After": "1"}
            )
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def version() -> Response:
        """The server's version and, from a deployment, what it runs (`deployment_info`), so a
        benchmark can say what it measured. Not an OpenAI route: extra fields break nothing."""
        body: dict = {"version": _version()}
        if ctx.deployment:
            body["deployment"] = ctx.deployment
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition: the router's request metrics and every instance's load."""
        stats = await ctx.instance_stats() if ctx.instance_stats else []
        body = ctx.dispatcher.metrics.render(stats, ctx.dispatcher.num_inflight)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def deployment_info(config: PdserveConfig, model_name: str) -> dict:
    """The deployment in a few fields: served model, its settings, instances, KV transfer.
    `model_name`: the model folder's name, used unless router.model_name is set."""
    counts = {
        "prefill": config.prefill.instances,
        "decode": config.decode.instances,
        "mixed": config.mixed.instances,
    }
    parts = [f"{counts['prefill']}P{counts['decode']}D"] if counts["prefill"] else []
    parts += [f"{counts['mixed']} mixed"] if counts["mixed"] else []
    return {
        "model": config.router.model_name or model_name,
        "model_path": config.model.path or "default (SmolLM2-135M-Instruct)",
        "device": config.model.device,
        "dtype": config.model.dtype,
        "load_format": config.model.load_format,
        "instances": counts,
        "topology": " + ".join(parts),
        "transfer": config.transfer.backend.value,
    }


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


async def _instances_ready(ctx: RouterContext) -> bool:
    if ctx.health is None:
        return True
    try:
        return bool(await ctx.health())
    except Exception as exc:  # an unreachable instance means "not ready", not a 500
        log.warning("health check failed: %s", exc)
        return False


def _check_model(ctx: RouterContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) < _OFFLOAD_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)


async def _completion_prompt(ctx: RouterContext, body: CompletionRequest) -> list[int]:
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        ids = await _encode(ctx.tokenizer, prompt, add_special_tokens=True) if prompt else []
    else:
        vocab = ctx.tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(
                400,
                f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )
        ids = list(prompt)
    if not ids:
        raise ApiError(400, "prompt: must not be empty", param="prompt")
    return ids


async def _chat_prompt(ctx: RouterContext, body: ChatCompletionRequest) -> list[int]:
    messages = [m.as_template_input() for m in body.messages]
    try:
        text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except (ChatMessageError, ChatTemplateError) as exc:
        raise ApiError(400, str(exc), param="messages") from None
    # The rendered template already holds the special tokens (BOS and role markers).
    return await _encode(ctx.tokenizer, text, add_special_tokens=False)


async def _generate(
    ctx: RouterContext,
    request: Request,
    body: SamplingFields,
    prompt_ids: list[int],
    max_tokens: tuple[str, int],
    shape: ResponseShape,
) -> Response:
    _check_context(ctx, body, prompt_ids, *max_tokens)
    sampling = _sampling_params(ctx, body, *max_tokens)
    job = ServeJob(prompt_ids, sampling, shape, body.stream, body.n)
    try:
        return await serve_request(ctx.dispatcher, ctx.tokenizer, ctx.token_texts, request, job)
    except Overloaded as exc:
        raise ApiError(
            503,
            f"the server is overloaded: {exc}",
            type="server_error",
            code="overloaded",
            headers={"Retry-After": "1"},
        ) from None
    except NoInstance as exc:
        raise ApiError(
            503, str(exc), type="server_error", code="no_instance", headers={"Retry-After": "5"}
        ) from None
    except TokenTimeout as exc:
        raise ApiError(504, str(exc), type="server_error", code="timeout") from None
    except InstanceOverloaded as exc:
        raise ApiError(
            503, str(exc), type="server_error", code="overloaded", headers={"Retry-After": "2"}
        ) from None
    except InstanceFailed as exc:
        raise ApiError(500, str(exc), type="server_error", code="instance_error") from None


def _check_context(
    ctx: RouterContext, body: SamplingFields, prompt_ids: list[int], name: str, limit: int
) -> None:
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if len(prompt_ids) >= ctx.max_model_len:
        raise ApiError(
            413,
            f"{prompt_param}: {len(prompt_ids)} tokens, but the context length "
            f"is {ctx.max_model_len}",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if len(prompt_ids) + limit > ctx.max_model_len:
        raise ApiError(
            413,
            f"{name}: {len(prompt_ids)} prompt tokens + {limit} = "
            f"{len(prompt_ids) + limit} exceeds the context length "
            f"{ctx.max_model_len}",
            param=name,
            code="context_length_exceeded",
        )


def _sampling_params(
    ctx: RouterContext, body: SamplingFields, name: str, limit: int
) -> SamplingParams:
    """The request's sampling parameters; a 400 naming the parameter when one is out of range
    (`name` is how the client called max_tokens)."""
    try:
        sampling = body.sampling_params(limit)
    except SamplingParamsError as exc:
        param = name if exc.param == "max_tokens" else exc.param
        raise ApiError(400, str(exc).replace("max_tokens", name, 1), param=param) from None
    if body.n > ctx.config.max_n:
        raise ApiError(400, f"n: at most {ctx.config.max_n}, got {body.n}", param="n")
    return sampling


def _new_request_id() -> str:
    return uuid.uuid4().hex
