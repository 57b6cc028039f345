"""The FastAPI app of dllm-serve: OpenAI routes over one model, its scheduler and its metrics.

``build_app(load)`` makes the app; ``load()`` runs at startup (uvicorn's lifespan, or each Ray Serve
replica's) and returns the ServerState: the Pipeline, the scheduler and worker, the metrics. The
same app runs under uvicorn (``dllm.serve.server``) and as a Ray Serve ingress (``dllm.serve.ray_app``).

Routes: POST /v1/chat/completions, POST /v1/completions (``stream: true``: server-sent events,
``data: {chunk}`` lines ending with ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics.
Every response carries ``X-Dllm-Replica``, the id of the server or replica that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from typing import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllm.engines.base import Backend
from dllm.errors import ConfigError
from dllm.exporter.config import DEFAULT_MAX_BATCH
from dllm.runtime import Pipeline
from dllm.serve.config import ServeConfig, Source
from dllm.serve.jobs import Failed, Finished, Job, Outcome, Progress
from dllm.serve.metrics import ServeMetrics
from dllm.serve.protocol import ChatCompletionRequest, CompletionRequest, Reply, error_body
from dllm.serve.requests import ModelInfo, RequestError, chat_request, completion_request
from dllm.serve.scheduler import BatchRunner, QueueFull, Scheduler, SequentialRunner

log = logging.getLogger("dllm.serve")
REPLICA_HEADER = "x-dllm-replica"
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}    # metrics labels


@dataclasses.dataclass
class ServerState:
    """Everything one server (or one replica) owns."""
    config: ServeConfig
    pipeline: Pipeline
    model: ModelInfo
    scheduler: Scheduler
    metrics: ServeMetrics
    replica: str
    created: int


def serving_batch(config: ServeConfig, engines_limit: int | None) -> int:
    """Requests decoded together: ``--max-batch``, or by default the engines' limit on a GPU (a step there
    reads every weight once whatever the batch) and 1 on a CPU (a step there is compute-bound, so a batch
    costs about as much as its requests one after another; docs/benchmarks.md)."""
    if config.max_batch is None:
        if not config.device.startswith("cuda"):
            return 1
        return engines_limit if engines_limit is not None else DEFAULT_MAX_BATCH
    if engines_limit is not None and config.max_batch > engines_limit:
        raise ConfigError(f"--max-batch {config.max_batch} exceeds the {engines_limit} sequences this engine "
                          f"directory was exported for; pass --max-batch {engines_limit} or less, or re-export "
                          f"with dllm-export --max-batch {config.max_batch}")
    return config.max_batch


def load_state(config: ServeConfig, replica: str | None = None, warmup: bool = True) -> ServerState:
    """Open the model (engine directory or checkpoint), check its tokenizer, warm it up once, and set
    up the scheduler (started by the app). Raises ConfigError naming the fix for a bad path."""
    path = config.path
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; pass an engine directory written by dllm-export "
                          "(or a checkpoint directory with --checkpoint)")
    on_ort = config.backend == Backend.ONNXRUNTIME
    if config.device == "cpu":
        # with ONNX Runtime, torch only glues engine calls together: its thread pool would fight ORT's
        threads = 1 if on_ort else config.threads
        if threads:
            torch.set_num_threads(threads)
    if config.source == Source.ENGINE_DIR:
        if not (path / "manifest.json").is_file():
            hint = (f"it is a checkpoint: serve it with --checkpoint {path}, or export it with `dllm-export {path} OUT`"
                    if (path / "config.json").is_file() else "pass a directory written by dllm-export")
            raise ConfigError(f"{path} has no manifest.json, so it is not an engine directory; {hint}")
        options = {"intra_op_threads": config.threads} if on_ort else {}
        if config.cuda_graphs:
            options["cuda_graphs"] = True
        pipe = Pipeline.from_dir(path, backend=config.backend.value, device=config.device, **options)
    else:
        pipe = Pipeline.from_checkpoint(path, dtype=config.dtype.value, device=config.device,
                                        cuda_graphs=config.cuda_graphs)
    pipe.tokenizer                      # a server needs text in and out: fail now, not at the first request
    default = config.default_decode_config()
    model = ModelInfo(config.model_name, pipe.max_seq_len, pipe.spec.vocab_size, pipe.spec.mask_id, default,
                      config.max_tokens)
    if warmup:                          # first calls build sessions and buffers; keep that out of request latency
        pipe.generate(pipe.encode("Hello"), default.replace(gen_length=default.block_length,
                                                            steps=default.block_length))
    replica = replica or f"{socket.gethostname()}-{os.getpid()}"
    max_batch = serving_batch(config, pipe.engines.max_batch)
    metrics = ServeMetrics(model=config.model_name, backend=config.backend.value, device=config.device,
                           replica=replica, max_batch=max_batch)
    runner = SequentialRunner(pipe, metrics) if max_batch == 1 else BatchRunner(pipe, metrics, max_batch)
    return ServerState(config, pipe, model, Scheduler(runner, metrics, config.max_queue), metrics, replica,
                       int(time.time()))


def build_app(load: Callable[[], ServerState]) -> FastAPI:
    """The dllm-serve app; ``load`` is called once at startup to get the ServerState."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.get_running_loop().run_in_executor(None, load)
        state.scheduler.start()
        app.state.dllm = state
        log.info("serving %s (replica %s)", state.model.name, state.replica)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.scheduler.stop)

    app = FastAPI(title="dllm-serve", lifespan=lifespan)
    app.add_middleware(ReplicaHeader)
    _add_error_handlers(app)

    @app.get("/health")
    async def health(request: Request):
        s: ServerState = request.app.state.dllm
        return {"status": "ok", "model": s.model.name, "replica": s.replica, "queue_depth": s.scheduler.depth,
                "running": s.scheduler.running, "max_batch": s.scheduler.runner.max_batch}

    @app.get("/metrics")
    async def metrics(request: Request):
        s: ServerState = request.app.state.dllm
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        s: ServerState = request.app.state.dllm
        return {"object": "list", "data": [{"id": s.model.name, "object": "model", "created": s.created,
                                            "owned_by": "dllm-deploy"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        s: ServerState = request.app.state.dllm
        gen = _checked(s, "chat", lambda: chat_request(body, s.model, s.pipeline.encode))
        return await _respond(s, request, gen, Reply("chat", s.model.name), body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        s: ServerState = request.app.state.dllm
        gen = _checked(s, "completions", lambda: completion_request(body, s.model, s.pipeline.encode))
        return await _respond(s, request, gen, Reply("completion", s.model.name), body)

    return app


def _checked(state: ServerState, endpoint: str, make):
    try:
        return make()
    except RequestError:
        state.metrics.count(endpoint, Outcome.REJECTED)
        raise


async def _respond(state: ServerState, request: Request, gen, reply: Reply, body):
    job = Job(gen, asyncio.get_running_loop())
    try:
        state.scheduler.submit(job)
    except QueueFull as e:
        state.metrics.count(gen.endpoint, Outcome.OVERLOADED)
        raise RequestError(f"the server is overloaded: {e}; retry later", status=503, type_="server_error",
                           code="overloaded") from None
    if gen.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        event = await _wait_final(job, request)
    finally:
        job.cancel()                      # no-op once finished; stops the generation if the client left
    if event is None:                     # the client disconnected; nobody reads this
        return Response(status_code=499)
    if isinstance(event, Failed):
        return JSONResponse(error_body(event.message, type_="server_error", code="generation_failed"), 500)
    return JSONResponse(reply.complete(event))


async def _wait_final(job: Job, request: Request):
    """The Finished or Failed event of a non-streaming job; None if the client disconnected first."""
    getter = asyncio.ensure_future(job.next_event())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.1)
            if done:
                event = getter.result()
                if isinstance(event, (Finished, Failed)):
                    return event
                getter = asyncio.ensure_future(job.next_event())
            elif await request.is_disconnected():
                return None
    finally:
        getter.cancel()


async def _sse(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one streaming job. Leaving early (client gone) cancels the job."""
    try:
        if reply.kind == "chat":
            yield _data(reply.chunk(None, first=True))
        while True:
            event = await job.next_event()
            if isinstance(event, Progress):
                yield _data(reply.chunk(event.text, canvas=event.canvas))
            elif isinstance(event, Finished):
                if event.text:
                    yield _data(reply.chunk(event.text))
                yield _data(reply.chunk(None, finish=event))
                if include_usage:
                    yield _data(reply.usage_chunk(event))
                break
            else:
                yield _data(error_body(event.message, type_="server_error", code="generation_failed"))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class ReplicaHeader:
    """ASGI middleware: adds X-Dllm-Replica to every response (streaming ones included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = getattr(scope["app"].state, "dllm", None)
        replica = (state.replica if state is not None else "starting").encode()

        async def send_with_replica(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), replica)]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is OpenAI's JSON error object, with a 4xx code for the client's mistakes."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(error_body(e.message, type_=e.type, param=e.param, code=e.code), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        state = getattr(request.app.state, "dllm", None)
        endpoint = _ENDPOINTS.get(request.url.path)
        if state is not None and endpoint is not None:
            state.metrics.count(endpoint, Outcome.REJECTED)
        errors = _field_errors(e.errors())
        return JSONResponse(error_body(_describe(errors), param=_param(errors)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}; see GET /v1/models, POST "
                        "/v1/chat/completions, POST /v1/completions",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, code=str(e.status_code)), e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type_="server_error"), 500)


def _field_errors(errors) -> list[dict]:
    """pydantic's errors with a union field's branches folded into one error on the field itself: ``stop: 3``
    fails as a string and as a list, and the client should read ``stop``, not ``stop.str``."""
    def branch(x) -> bool:                # the type tag pydantic puts in a union member's location
        return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x or x[:1].isupper())

    out: list[dict] = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        field = tuple(x for x in loc if not branch(x))
        if field != loc:
            err = {**err, "loc": field}
            same = next((o for o in out if o.get("loc") == err["loc"] and o.get("union")), None)
            msg = err.get("msg", "")
            alternative = msg[:1].lower() + msg[1:]             # "... or input should be ..."
            if same is not None:
                if alternative not in same["msg"]:
                    same["msg"] = f"{same['msg']} or {alternative}"
                continue
            err["union"] = True
        out.append(err)
    return out


def _param(errors) -> str | None:
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
    return ".".join(loc) or None


def _describe(errors) -> str:
    """One line for pydantic's errors: which fields, what is wrong."""
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))}); send a "
                         "JSON object")
        elif kind == "extra_forbidden":
            parts.append(f"unrecognized request argument {loc!r}; decoding knobs go in the `dllm` object")
        elif kind == "missing":
            parts.append(f"missing required field {loc!r}")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
