"""The HTTP side of `sharp serve`: FastAPI routes in OpenAI's shapes over a `Service`, and nothing
else (the request and response shapes are schema.py's, the answering service.py's, the runner that
starts uvicorn and the worker command.py's).

GET /health, GET /v1/models, POST /v1/chat/completions (plain or streamed as server-sent events).
Every failure is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status,
and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sharp_cli.serve import schema
from sharp_cli.serve.schema import ApiError
from sharp_cli.serve.service import Question, Service, api_error
from sharp_cli.serve.slow_clients import BodyBytes, read_body
from sharp_cli.serve.worker import Busy, Job

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
PUBLIC_ONLY = "sharp.public_only"  # scope key: the request came without the API key (GET /health only)


def create_app(service: Service, lifespan=None) -> FastAPI:
    """The routes over `service`. lifespan: what starts and stops the service's worker with the
    server (command.worker_lifespan); the runner passes it."""
    app = FastAPI(title="sharp serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if service.settings.api_key is not None:
        app.add_middleware(BearerAuth, key=service.settings.api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in OpenAI's shape too
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", code))

    @app.get("/health")
    async def health(request: Request):
        """Liveness, open to all (load balancers send no key); the details need the key when one is set."""
        worker = service.worker
        body = {"status": "ok" if worker.alive else "stopping"}
        if not request.scope.get(PUBLIC_ONLY):
            body.update(model=service.model_id, busy=worker.busy, running=getattr(worker, "running", int(worker.busy)),
                        waiting=worker.waiting, **dict(worker.stats))
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [schema.model_card(service.model_id, service.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in service.settings.model_ids:
            return error_response(ApiError(404, f"The model '{model_id}' does not exist", "model_not_found"))
        return schema.model_card(service.model_id, service.created)

    settings = service.settings
    # Bodies are read before their request takes a place in the queue (a client that stalls holds
    # none), so the bytes of bodies being read are bounded instead: as much as a full queue of
    # requests carrying the largest upload held before.
    bodies = BodyBytes(service.worker.capacity * settings.media.max_body_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        worker = service.worker
        ticket = question = slot = None
        try:
            with bodies.hold() as hold:  # until the body is parsed and an upload saved to its file
                body = await read_body(request, settings, hold)
                ticket = worker.admit()
                question = await checked_question(body, service)
                del body
            slot = await worker.decode_slot()
            clip = await anyio.to_thread.run_sync(service.decode, question)
            job = Job(service.work(clip, question), ticket, slot)
            worker.submit(job)
        except BaseException as exc:  # the job never reached the queue: give its places back
            for place in (ticket, slot):
                if place is not None:
                    place.release()
            if question is not None:
                question.source.discard()
            if not isinstance(exc, Exception):  # cancelled (the server is stopping)
                raise
            if isinstance(exc, Busy):
                return error_response(ApiError(503, str(exc), exc.code))
            return error_response(api_error(exc))
        return await respond(request, job, question, service.model_id)

    return app


async def checked_question(body: bytes, service: Service) -> Question:
    """The body parsed and checked, with an upload already saved to its temporary file, so that
    neither the body nor the base64 text stays in memory while the request waits."""
    question = service.check(schema.parse_request(body))
    if question.source.payload is not None:
        question = await anyio.to_thread.run_sync(service.save_upload, question)
    return question


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if error.status == 408:  # the client is too slow to go on talking to: the connection ends here
        headers = {"Connection": "close"}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# -- answering ---------------------------------------------------------------------------------------
async def respond(request: Request, job: Job, question: Question, model: str):
    request_id, created = schema.new_id(), schema.now()
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        if not question.stream:
            while True:
                event = await job.events.get()
                if event[0] == "text":  # the answer comes whole with "done"
                    continue
                if event[0] == "done" and not job.cancelled():
                    record, finish = event[1]
                    return JSONResponse(schema.completion(request_id, model, created, schema.plain(record), finish))
                return _terminal_error(event)
        # Streamed: wait for the first event before sending headers, so that a request refused by
        # the model (a bad option it alone can judge) still gets its 4xx status.
        first = await job.events.get()
        if first[0] not in ("text", "done") or job.cancelled():
            return _terminal_error(first)
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()
    return _JobStream(job, _events(job, first, request_id, model, created, question.include_usage),
                      media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _JobStream(StreamingResponse):
    """However the stream ends (finished, client gone, server stopping), the job ends with it:
    Starlette cancels the response on a disconnect, and a job still running stops between tokens."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _events(job: Job, event, request_id: str, model: str, created: int, include_usage: bool):
    """The server-sent events of one answer: a role chunk, the text as it comes, a last chunk with
    the finish reason and the `sharp` record (then usage, if asked for), and `[DONE]`."""
    yield schema.sse(schema.chunk(request_id, model, created, {"role": "assistant", "content": ""}))
    while True:
        if event[0] == "text":
            yield schema.sse(schema.chunk(request_id, model, created, {"content": event[1]}))
        elif event[0] == "done" and not job.cancelled():
            record, finish = event[1]
            record = schema.plain(record)
            yield schema.sse(schema.chunk(request_id, model, created, {}, finish, sharp=record))
            if include_usage:
                yield schema.sse(schema.usage_chunk(request_id, model, created, record))
            break
        else:  # too late for a status code: the error goes in the stream, as OpenAI's servers do
            yield schema.sse(_terminal_error(event, as_body=True))
            break
        event = await job.events.get()
    yield schema.sse("[DONE]")


def _terminal_error(event, as_body: bool = False):
    if event[0] == "error":
        error = api_error(event[1])
    elif event[0] == "gone":  # nobody reads this; the status tells the access log what happened
        error = ApiError(499, "the client closed the request", "client_closed")
    else:  # "dropped", or "done" after a cancel: the server is stopping
        error = ApiError(503, "the server is shutting down; the request was not answered", "shutting_down")
    return error.body() if as_body else error_response(error)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Once the body is read, the next ASGI message is the disconnect, if the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            job.events.put_nowait(("gone",))
            return


class BearerAuth:
    """`Authorization: Bearer <key>` on every request, or a 401 (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        if scope.get("path") == "/health" and scope.get("method") in ("GET", "HEAD"):  # liveness stays open
            return await self.app({**scope, PUBLIC_ONLY: True}, receive, send)
        message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
        await error_response(ApiError(401, message, "invalid_api_key"))(scope, receive, send)
