"""The bridge between the asyncio server and the engine's thread.

The engine (gpt/generation/engine.py) owns the model and runs on its own thread; each choice of a request
is one engine request whose events the engine thread hands to the event loop with
`loop.call_soon_threadsafe`, onto the asyncio queue of the HTTP request they belong to (a `Job`). The
HTTP side only reads that queue, so it never blocks on the model.

A job ends in one of three ways: every choice finished; the client went away (`Job.abort(ClientGone())`:
its engine requests are cancelled, which frees their slots within one engine step); or the server shut
down (`Service.begin_shutdown`: no new jobs, and what is still running after the drain time is aborted
with a 503-style error, so a streaming client sees an error event instead of a cut connection).
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

from ..errors import ConfigError
from ..generation.engine import Engine, Event, RequestParams
from .protocol import (SSE_DONE, APIError, CompletionRequest, choice_object, completion_object, new_id, now, sse,
                       usage_object)


class ClientGone(Exception):
    """The HTTP client disconnected: nothing more is sent."""


class Job:
    """One HTTP request's choices in the engine: their events arrive on one asyncio queue as
    (choice index, Event); (None, exception) ends the job early."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: CompletionRequest):
        self.loop, self.request = loop, request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine_requests: list = []
        self.id, self.created = new_id(), now()

    def on_event(self, index: int, event: Event) -> None:
        """Called on the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:      # the event loop is closed: the server has gone, nobody is listening
            pass

    def cancel(self) -> None:
        for r in self.engine_requests:
            r.cancel()

    def abort(self, reason: Exception) -> None:
        """Cancel every choice and end the job's event stream with `reason` (on the event loop)."""
        self.cancel()
        self.queue.put_nowait((None, reason))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished; raises the reason of an abort."""
        remaining = self.request.choices
        while remaining:
            index, event = await self.queue.get()
            if index is None:
                raise event
            if event.finish_reason is not None:
                remaining -= 1
            yield index, event

    def usage(self) -> dict:
        n = self.request.n
        prompt = sum(self.engine_requests[i].prompt_tokens for i in range(0, len(self.engine_requests), n))
        return usage_object(prompt, sum(r.completion_tokens for r in self.engine_requests))


def _failed(event: Event, request) -> APIError | None:
    """The error a finishing event stands for, if any: the engine failed (request.error says why), or it
    cancelled the choice itself (it is stopping)."""
    if event.finish_reason == "error":
        return APIError(500, f"generation failed in the engine ({request.error or 'no reason given'}); the "
                             f"server log has the details", code="engine_error")
    if event.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
    return None


class Service:
    """Submits checked requests to the engine and turns their events into OpenAI answers.

    max_queued: at most this many choices wait for a slot (beyond the running ones); a request that would
    go past it is refused with 503 (code "overloaded") instead of waiting without bound."""

    def __init__(self, engine: Engine, model_name: str, max_queued: int = 256):
        self.engine, self.model_name, self.max_queued = engine, model_name, max_queued
        self.jobs: set[Job] = set()
        self.closing = False
        self.served = 0                 # requests answered in full
        self.started = now()            # for /v1/models' `created`
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- life ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """On the event loop, at server start: bind to it and start the engine's thread."""
        self.loop = asyncio.get_running_loop()
        self.engine.start()

    def begin_shutdown(self, drain_timeout: float) -> None:
        """Refuse new requests; abort the running ones after drain_timeout seconds (0: now)."""
        if self.closing:
            return
        self.closing = True
        if drain_timeout <= 0:
            self.cancel_all()
        else:
            self.loop.call_later(drain_timeout, self.cancel_all)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.abort(APIError(503, "the request was cancelled: the server is shutting down",
                               code="shutting_down"))

    def stop(self, timeout: float = 10.0) -> None:
        """At server exit: cancel what is left and stop the engine's thread."""
        self.closing = True
        self.cancel_all()
        self.engine.stop(drain=False, timeout=timeout)

    def health(self) -> dict:
        return {"status": "shutting down" if self.closing else "ok", "model": self.model_name,
                "slots": self.engine.slots, "busy": self.engine.busy(), "waiting": self.engine.waiting(),
                "requests_in_flight": len(self.jobs), "requests_served": self.served}

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, request: CompletionRequest) -> Job:
        if self.closing:
            raise APIError(503, "the server is shutting down; send the request elsewhere or later",
                           code="shutting_down")
        waiting, free = self.engine.waiting(), self.engine.slots - self.engine.busy()
        if waiting + request.choices - free > self.max_queued:
            raise APIError(503, f"the server is overloaded ({waiting} choices already wait for one of its "
                                f"{self.engine.slots} slots); retry later", code="overloaded")
        job = Job(self.loop, request)
        try:
            for p, ids in enumerate(request.prompts):
                for j in range(request.n):
                    index = p * request.n + j
                    params = RequestParams(max_tokens=request.max_tokens, seed=request.seed_of(index),
                                           stop=request.stop, **request.sampling)
                    job.engine_requests.append(self.engine.submit(ids, params,
                                                                  functools.partial(job.on_event, index)))
        except ConfigError as e:      # a rule of the engine's that protocol.py does not know
            job.cancel()
            raise APIError(400, str(e), code="invalid_value") from None
        self.jobs.add(job)
        return job

    def _finish(self, job: Job, served: bool) -> None:
        job.cancel()                  # a no-op for finished choices; frees the slots of the others
        self.jobs.discard(job)
        self.served += served

    async def complete(self, job: Job) -> dict:
        """The whole answer of a non-streaming request; APIError (or ClientGone) if it cannot be given."""
        r = job.request
        texts = [r.prompt_texts[i // r.n] if r.echo else "" for i in range(r.choices)]
        reasons: list[str | None] = [None] * r.choices
        try:
            async for index, event in job.events():
                texts[index] += event.text
                if event.finish_reason is not None:
                    error = _failed(event, job.engine_requests[index])
                    if error is not None:
                        raise error
                    reasons[index] = event.finish_reason
        except BaseException:
            self._finish(job, False)
            raise
        self._finish(job, True)
        choices = [choice_object(i, texts[i], reasons[i]) for i in range(r.choices)]
        return completion_object(job.id, job.created, self.model_name, choices, job.usage())

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """The server-sent events of a streaming request: one chunk per event (choice index, text delta,
        finish_reason on the last), the usage chunk when asked for, then [DONE]. An error after the start
        is an error event (OpenAI's error object), then [DONE]; a client that left gets nothing more."""
        r = job.request

        def chunk(index: int, text: str, reason: str | None = None, usage: dict | None = None) -> bytes:
            choices = [] if index < 0 else [choice_object(index, text, reason)]
            return sse(completion_object(job.id, job.created, self.model_name, choices, usage))

        served = False
        try:
            if r.echo:
                for i in range(r.choices):
                    yield chunk(i, r.prompt_texts[i // r.n])
            try:
                async for index, event in job.events():
                    error = None if event.finish_reason is None else _failed(event, job.engine_requests[index])
                    if error is not None:
                        raise error
                    yield chunk(index, event.text, event.finish_reason)
                if r.include_usage:
                    yield chunk(-1, "", usage=job.usage())
                served = True
            except APIError as e:
                yield sse(e.body())
            yield SSE_DONE
        except ClientGone:
            pass
        finally:
            self._finish(job, served)
