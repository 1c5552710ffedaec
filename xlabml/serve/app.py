"""The FastAPI application: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``, and
``/health``.

Handlers run on the event loop and never compute with the model: they validate a request, tokenize its
prompts (in a worker thread), check its cost against ``Limits``, hand it to the ``Engine`` and relay its
events, as server-sent events (``stream``) or as one JSON body. Every failure a client can cause is an
OpenAI-style JSON error with a 4xx status, and the server goes on serving: a malformed body or a bad value is
400, a missing or wrong API key 401, an unknown model or path 404, a body over ``max_body_bytes`` 413, a full
queue 429.

Prompts: a string is ``<sos>`` followed by its tokens (as ``xlab-infer`` does); a list of token ids is taken
as it is (no ``<sos>``). ``usage.prompt_tokens`` counts the ids fed (once per prompt, whatever ``n``),
``usage.completion_tokens`` every token generated (a closing <eos> or role token included). ``finish_reason`` is
"stop" (<eos>, a chat template's role token, or a stop string) or "length" (``max_tokens`` reached).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xlabml.serve.chat import render_chat
from xlabml.serve.engine import ChoiceSpec, Engine, Job
from xlabml.serve.protocol import APIError, ChatRequest, CompletionRequest, _Sampling, error_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.5


@dataclass
class Limits:
    """What one request may cost; over a bound is a 4xx (429 for the queue), never an out-of-memory crash.

    Attributes:
        max_tokens: the most tokens one choice may generate (also chat's default ``max_tokens``).
        max_prompt_tokens: the longest prompt, in tokens (``<sos>`` and a chat's template included).
        max_n: the most choices per prompt (``n``).
        max_batch: the most choices generated together; one request's choices must fit.
        max_queue: the most choices waiting for room in the batch.
        max_body_bytes: the largest request body.
    """

    max_tokens: int = 512
    max_prompt_tokens: int = 512
    max_n: int = 8
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20


def create_app(model, tokenizer, *, name: str, limits: Optional[Limits] = None, api_key: Optional[str] = None,
               checkpoint=None, created: Optional[int] = None) -> FastAPI:
    """The server's application. Its lifespan starts the engine thread and stops it.

    Args:
        model: the model to serve, on its device, in the dtype to run (e.g. ``LoadedCheckpoint.model``).
        tokenizer: its ``Tokenizer``.
        name: the model id clients name in ``model``.
        limits: ``Limits`` (default: its defaults).
        api_key: when given, every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (401 otherwise);
            ``/health`` stays open.
        checkpoint: the ``LoadedCheckpoint`` it came from, for ``render_chat`` (its chat template, if any).
        created: the model's creation time (Unix seconds) for ``/v1/models``; default: now.
    """
    limits = limits or Limits()
    hparams = getattr(model, "hparams", {})
    block_size = int(hparams.get("max_len", getattr(model, "max_len", 0)))
    if block_size < 1:
        raise ValueError("the model records no max_len (hparams['max_len']): cannot tell its context window")
    eos = tokenizer[tokenizer.eos_token]
    n_vocab = int(hparams.get("n_vocab", len(tokenizer)))
    # never generate what cannot be decoded or cannot follow: <sos>, <pad>, classes past the tokenizer
    excluded = [tokenizer[tokenizer.sos_token], tokenizer[tokenizer.pad_token], *range(len(tokenizer), n_vocab)]
    engine = Engine(model, tokenizer, block_size=block_size, eos_class=eos, exclude_classes=excluded,
                    max_batch=limits.max_batch, max_queue=limits.max_queue)
    served = _Served(name, tokenizer, engine, limits, checkpoint, int(time.time() if created is None else created))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="xlab-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return JSONResponse(_validation_error(error.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(error.status_code, message), status_code=error.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "live_choices": engine.live_rows,
                "waiting_choices": engine.waiting_rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        served.check_model(model_id)
        return served.card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await served.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await served.chat(body, request)

    # pure ASGI layers, outermost last: the size bound, then the key (before the body is even parsed)
    app.add_middleware(_JSONBody)
    app.add_middleware(_APIKey, api_key=api_key)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    return app


# what a field that takes several forms expects (pydantic reports one failure per form)
UNION_HINTS = {"prompt": "a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
               "stop": "a string or a list of strings",
               "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts"}
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|constrained-.*|function-.*)$")


def _validation_error(errors: list[dict]) -> dict:
    """The first of pydantic's errors as one OpenAI-style message naming the field and the value."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc, union = [], False
    for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
        if isinstance(part, str) and _TYPE_TAG.match(part):  # one form of a union: the field's other forms failed too
            union = True
            break
        loc.append(str(part))
    if first.get("type") == "json_invalid":
        return error_body(400, f"malformed JSON in the request body: {first.get('msg')} "
                          f"(at position {loc[0] if loc else '?'})")
    got = first.get("input")
    if isinstance(got, bytes):
        got = got.decode("utf-8", "replace")
    got = json.dumps(got, default=str)[:100]
    if not loc:  # the body itself: missing, not JSON (no Content-Type: application/json), or not an object
        got = "nothing" if first.get("input") is None else got
        return error_body(400, f"the request body must be a JSON object (got {got})")
    field = ".".join(loc)
    if union:
        message = f"expected {UNION_HINTS.get(loc[-1], 'a value of another type')}"
    else:
        message = first.get("msg", "invalid value")
    if first.get("type") != "missing":
        message += f" (got {got})"
    return error_body(400, f"{field}: {message}", field)


class _Served:
    """The request handling around one engine."""

    def __init__(self, name, tokenizer, engine: Engine, limits: Limits, checkpoint, created: int):
        self.name, self.tokenizer, self.engine, self.limits = name, tokenizer, engine, limits
        self.checkpoint, self.created = checkpoint, created
        self.sos = tokenizer[tokenizer.sos_token]

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "xlab",
                "max_model_len": self.engine.block_size}

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.name!r}", "model",
                           "model_not_found")

    def _check(self, body: _Sampling, max_tokens: int, choices: int) -> None:
        self.check_model(body.model)
        bad = body.unsupported()
        if bad:
            name, value = next(iter(bad.items()))
            raise APIError(400, f"{name}={json.dumps(value, default=str)[:100]} is not supported by this server",
                           name)
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.limits.max_tokens}",
                           "max_tokens")
        n = body.n or 1
        if n > self.limits.max_n:
            raise APIError(400, f"n={n} exceeds this server's limit of {self.limits.max_n}", "n")
        if choices > self.limits.max_batch:
            raise APIError(400, f"the request asks for {choices} choices; this server generates at most "
                           f"{self.limits.max_batch} at once", "n")

    def _check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{self.limits.max_prompt_tokens}", param, "context_length_exceeded")

    # --- /v1/completions ---

    async def completions(self, body: CompletionRequest, request: Request):
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is an empty list; expected a string, strings or token ids", "prompt")
        n = body.n or 1
        max_tokens = min(16, self.limits.max_tokens) if body.max_tokens is None else body.max_tokens  # OpenAI's 16
        self._check(body, max_tokens, n * len(prompts))
        stop = body.stops()
        ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if len(prompt) > 64 * self.limits.max_prompt_tokens:  # no token is that long: no need to encode
                    raise APIError(400, f"the prompt has {len(prompt)} characters; this server accepts at most "
                                   f"{self.limits.max_prompt_tokens} tokens", "prompt", "context_length_exceeded")
                ids.append([self.sos] + await asyncio.to_thread(self.tokenizer.encode, prompt))
            else:
                if not prompt:
                    raise APIError(400, "prompt has an empty list of token ids; expected at least one", "prompt")
                if max(prompt) >= len(self.tokenizer):
                    raise APIError(400, f"prompt token id {max(prompt)} is outside the vocabulary "
                                   f"0..{len(self.tokenizer) - 1}", "prompt")
                ids.append(list(prompt))
            self._check_prompt(ids[-1])
        echoes = [self.tokenizer.decode(i) if body.echo else "" for i in ids]
        specs = [ChoiceSpec(p, max_tokens, body.sampling(), body.seed, stop) for p in ids for _ in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in ids)

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.name,
                    "choices": choices}

        def piece(index: int, text: str, reason: Optional[str]) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        job = self._submit(specs)
        if body.stream:
            first = [chunk([piece(i, echoes[i // n], None)]) for i in range(len(specs)) if echoes[i // n]]
            return self._stream(job, specs, first, lambda i, text, reason: chunk([piece(i, text, reason)]),
                                body, prompt_tokens, chunk, request)
        texts, reasons, tokens = await self._collect(job, specs, request)
        result = chunk([piece(i, echoes[i // n] + texts[i], reasons[i]) for i in range(len(specs))])
        result["usage"] = _usage(prompt_tokens, sum(tokens))
        return result

    # --- /v1/chat/completions ---

    async def chat(self, body: ChatRequest, request: Request):
        n = body.n or 1
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self.limits.max_tokens if max_tokens is None else max_tokens
        self._check(body, max_tokens, n)
        messages = [(m.role, m.text()) for m in body.messages]
        if sum(len(text) for _, text in messages) > 64 * self.limits.max_prompt_tokens:
            raise APIError(400, f"the messages are longer than this server's limit of {self.limits.max_prompt_tokens}"
                           " tokens", "messages", "context_length_exceeded")
        rendered = await asyncio.to_thread(render_chat, messages, self.tokenizer, self.checkpoint)
        self._check_prompt(rendered.ids, "messages")
        stop = body.stops()
        stop += [s for s in rendered.stop if s not in stop]
        specs = [ChoiceSpec(rendered.ids, max_tokens, body.sampling(), body.seed, stop, rendered.strip,
                            rendered.stop_ids) for _ in range(n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": choices}

        def delta(index: int, text: str, reason: Optional[str]) -> dict:
            return chunk([{"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                           "finish_reason": reason}])

        job = self._submit(specs)
        if body.stream:
            first = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(n)]
            return self._stream(job, specs, first, delta, body, len(rendered.ids), chunk, request)
        texts, reasons, tokens = await self._collect(job, specs, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": choices, "usage": _usage(len(rendered.ids), sum(tokens))}

    # --- the engine's events ---

    def _submit(self, specs: list[ChoiceSpec]) -> Optional[Job]:
        """Queues the choices that generate anything (max_tokens > 0); None when there are none."""
        if specs[0].max_tokens == 0:
            return None
        job = Job(specs, asyncio.get_running_loop())
        self.engine.submit(job)
        return job

    async def _events(self, job: Optional[Job], specs: list[ChoiceSpec], request: Request
                      ) -> AsyncIterator[tuple]:
        """The job's events until every choice ended; an error raises APIError, a client gone _Disconnected (the
        job is cancelled then, or whenever the caller stops early)."""
        if job is None:  # max_tokens=0: nothing to generate
            for i in range(len(specs)):
                yield ("end", i, "length", 0)
            return
        left = len(specs)
        try:
            while left:
                for event in await _next_events(job, request):
                    if event[0] == "error":
                        raise APIError(event[1], event[2])
                    left -= event[0] == "end"
                    yield event
        finally:
            job.cancel()

    async def _collect(self, job: Optional[Job], specs: list[ChoiceSpec], request: Request):
        texts, reasons, tokens = [""] * len(specs), [None] * len(specs), [0] * len(specs)
        try:
            async for event in self._events(job, specs, request):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]], tokens[event[1]] = event[2], event[3]
        except _Disconnected:
            raise APIError(400, "the client disconnected") from None
        return texts, reasons, tokens

    def _stream(self, job: Optional[Job], specs: list[ChoiceSpec], first: list[dict], make, body: _Sampling,
                prompt_tokens: int, chunk, request: Request) -> StreamingResponse:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            tokens = 0
            try:
                for c in first:
                    yield _sse(c)
                async for event in self._events(job, specs, request):
                    if event[0] == "text":
                        yield _sse(make(event[1], event[2], None))
                    else:
                        tokens += event[3]
                        yield _sse(make(event[1], "", event[2]))
                if include_usage:
                    yield _sse({**chunk([]), "usage": _usage(prompt_tokens, tokens)})
                yield "data: [DONE]\n\n"
            except APIError as error:
                yield _sse(error.body())
            except _Disconnected:
                pass

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


class _Disconnected(Exception):
    """The client closed its connection."""


async def _next_events(job: Job, request: Request) -> list[tuple]:
    """The job's next events; raises _Disconnected if the client hangs up meanwhile (polled each second: with
    ASGI 2.4 servers nothing else notices a client gone while its request waits)."""
    get = asyncio.ensure_future(job.events())
    try:
        while True:
            done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if done:
                return get.result()
            if await request.is_disconnected():
                raise _Disconnected()
    finally:
        get.cancel()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _APIKey:
    """Refuses ``/v1`` requests without ``Authorization: Bearer <key>`` (401), before reading their body."""

    def __init__(self, app, api_key: Optional[str]):
        self.app, self.key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.key is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("no API key given: send 'Authorization: Bearer <key>'" if not given
                           else "incorrect API key")
                return await _respond(send, 401, error_body(401, message, code="invalid_api_key"))
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuses request bodies over `max_bytes` (413), by their Content-Length or as they arrive."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _respond(send, 413, self._error())
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _respond(send, 413, self._error())

    def _error(self) -> dict:
        return error_body(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                          code="request_too_large")


class _JSONBody:
    """Reads every request body as JSON, as OpenAI's API does: ``curl -d`` sends its JSON as a form, and FastAPI
    would not parse a body that is not labelled JSON."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _respond(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
