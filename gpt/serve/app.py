"""The HTTP application (Starlette): the OpenAI routes, the health check and the web page.

    POST /v1/completions    OpenAI's completions, streamed as server-sent events with "stream": true
    GET  /v1/models         the served model (and GET /v1/models/NAME)
    GET  /health            200 {"status": "ok", slots, busy, waiting, ...}; 503 while shutting down
    GET  /                  the web page (gpt/web/: plain HTML, CSS and JavaScript, no build step)

Every error is OpenAI's error object with the status that fits: 400 for a request that cannot be served
(the field named in `param`), 404 for an unknown path or model, 405 for a wrong method, 413 for a body
over --max-body-bytes, 503 while shutting down or overloaded, and 500, without a traceback, for a bug
(the traceback goes to the server's log).

A client that disconnects is noticed while its request waits or streams (an ASGI `http.disconnect`
message, watched by its own task): its choices are cancelled in the engine at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .protocol import APIError, Limits, error_object, models_object, parse_completion_request, parse_json, to_json
from .service import ClientGone, Job, Service

log = logging.getLogger("gpt.serve")

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
             "/app.js": ("app.js", "text/javascript; charset=utf-8"),
             "/style.css": ("style.css", "text/css; charset=utf-8")}


def web_file(name: str) -> bytes:
    """A file of the web page, from the package data (gpt/web/)."""
    return resources.files("gpt").joinpath("web", name).read_bytes()


class JSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return to_json(content)


def error_response(e: APIError) -> Response:
    return JSON(e.body(), status_code=e.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (by Content-Length, or while it arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most {limit:,} "
                            f"(--max-body-bytes)", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is over {limit:,} bytes, the most this server takes "
                                f"(--max-body-bytes)", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@contextlib.asynccontextmanager
async def _watch_disconnect(receive, job: Job):
    """While the block runs, a client that disconnects aborts the job (its engine requests cancelled)."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    watcher.add_done_callback(lambda t: None if t.cancelled() or t.exception() else job.abort(ClientGone()))
    try:
        yield
    finally:
        watcher.cancel()


class EventStream(Response):
    """A text/event-stream response fed by a job's server-sent events, which watches for the client
    leaving while it streams."""

    media_type = "text/event-stream"

    def __init__(self, events, job: Job):    # no body, hence no Response.__init__ (it would send content-length: 0)
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events, self.job = events, job

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async with _watch_disconnect(receive, self.job):
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:               # the connection broke while sending: the client is gone
            self.job.abort(ClientGone())
        finally:
            await self.events.aclose()


def create_app(service: Service, limits: Limits, encode, tokenizer, max_body_bytes: int = 1 << 20) -> Starlette:
    """The application around a Service (which owns the engine; its lifespan starts and stops the engine).
    encode(text) -> token ids: how prompt strings are tokenized."""
    pages = {path: (web_file(name), media) for path, (name, media) in WEB_FILES.items()}

    async def completions(request: Request) -> Response:
        try:
            body = parse_json(await _read_body(request, max_body_bytes))
            checked = parse_completion_request(body, limits, tokenizer, encode)
            job = service.submit(checked)
        except APIError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)
        if checked.stream:
            return EventStream(service.stream(job), job)
        try:
            async with _watch_disconnect(request.receive, job):
                answer = await service.complete(job)
        except APIError as e:
            return error_response(e)
        except ClientGone:
            return Response(status_code=499)   # nobody reads it
        return JSON(answer)

    async def models(request: Request) -> Response:
        return JSON(models_object([service.model_name], service.started))

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name != service.model_name:
            return error_response(APIError(404, f"model {name!r} is not served here; GET /v1/models lists "
                                                f"{service.model_name!r}", param="model", code="model_not_found"))
        return JSON(models_object([name], service.started)["data"][0])

    async def health(request: Request) -> Response:
        state = service.health()
        return JSON(state, status_code=503 if service.closing else 200)

    async def page(request: Request) -> Response:
        content, media = pages[request.url.path]
        return Response(content, media_type=media, headers={"cache-control": "no-cache"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.url.path}; this server has POST /v1/completions, GET /v1/models, " \
                      f"GET /health and the web page at /"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSON(error_object(message, kind), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
        return JSON(error_object(f"internal error ({type(exc).__name__}); the server log has the traceback",
                                 "server_error"), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              *(Route(path, page, methods=["GET"]) for path in pages)]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
