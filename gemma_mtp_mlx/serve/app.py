"""The HTTP side of `gemma-chat serve`: OpenAI's `/v1/chat/completions` (streamed or not),
`/v1/completions`, `/v1/models`, and `/health`, as a Starlette app over one `Scheduler`.

Every refusal has the OpenAI error shape and the right status: bad JSON or fields 400, an
unknown model 404, a prompt over the context 400 `context_length_exceeded` (a long text is
counted only as far as the context, never tokenized whole), a parameter we cannot honour 400
`unsupported_parameter`, a body too large 413, a client too slow to send it 408, every slot and
place in line taken 429, a server shutting down 503; an engine failure is a 500 `server_error`
told in one line of the server's log (with its traceback under --debug), never to the client.
A streamed answer that cannot end normally (the engine failed on it, or the shutdown's grace
ran out) ends with a chunk whose `finish_reason` is "abort" (vLLM's name), an error event, and
`[DONE]`.

Each answer's `usage` carries our speculative statistics in an extra `speculative` object
(OpenAI clients ignore unknown fields); a thinking answer's thought arrives as
`reasoning_content`, as vLLM sends it.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat.budget import count_tokens
from ..engine.generate import encode_prompt
from ..errors import GemmaChatError
from ..images.fetch import fetch_image
from ..images.messages import has_images
from .answer_text import AnswerText
from .failures import Failures
from .limits import BodyLimit
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse, unsupported
from .scheduler import Busy, Job, Sampling, Scheduler, ShuttingDown

# What `usage.speculative` carries of an answer's GenerationStats.
SPECULATIVE_FIELDS = (
    "rounds",
    "drafted",
    "accepted",
    "acceptance_rate",
    "mean_accepted_length",
    "acceptance_by_position",
    "tokens_per_second",
    "baseline_tokens_per_second",
    "speedup",
)


@dataclass
class ServeOptions:
    batch: int = 4  # answers decoded together
    queue: int = 32  # requests that may wait for a slot
    max_request_bytes: int = 1 << 20
    max_tokens: int = 512  # for requests that name no limit
    mtp: bool = True
    draft_tokens: int | None = None
    shutdown_grace: float = 5.0  # seconds answers under way get to finish on SIGTERM or Ctrl-C
    read_timeout: float = 30.0  # seconds a client may take over its request head or a body part
    debug: bool = False  # tracebacks in the log
    allow_image_urls: bool = False  # fetch http(s) image_url parts (else data: URLs only)


@dataclass
class Piece:
    """What one engine event adds to an answer, as text."""

    thinking: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict = field(default_factory=dict)
    rows_together: int = 1


def create_app(pair, model_name: str, options: ServeOptions | None = None) -> Starlette:
    options = options or ServeOptions()
    scheduler = Scheduler(
        pair,
        batch=options.batch,
        queue_limit=options.queue,
        mtp=options.mtp,
        draft_tokens=options.draft_tokens,
        debug=options.debug,
    )
    api = Api(pair, model_name, scheduler, options)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        middleware=[
            Middleware(Failures, debug=options.debug),
            Middleware(BodyLimit, max_bytes=options.max_request_bytes, timeout=options.read_timeout),
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.scheduler, app.state.options = scheduler, options  # for the server (serve/server.py)
    return app


async def _api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    # Starlette's own refusals (unknown path 404, wrong method 405) in the same shape.
    return await _api_error(request, ApiError(error.status_code, error.detail))


class Api:
    def __init__(self, pair, model_name: str, scheduler: Scheduler, options: ServeOptions):
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.model_name = model_name
        self.scheduler = scheduler
        self.options = options
        self.context_limit = pair.context_limit
        self.mtp = options.mtp and pair.drafter is not None
        self.created = int(time.time())

    # -- routes ------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def health(self, request: Request) -> Response:
        if self.scheduler.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not self.scheduler.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        s = self.scheduler
        return JSONResponse({"status": "ok", "running": s.running, "waiting": s.waiting})

    async def chat_completions(self, request: Request) -> Response:
        req = parse(ChatCompletionRequest, await _json(request))
        self._check_model(req.model)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        messages = req.chat_messages()
        self._check_length([text_of(m["content"]) for m in messages], "messages")
        try:
            if has_images(messages):
                # Decoding and resizing pictures (maybe fetching them) is not the event loop's work.
                prompt = await asyncio.to_thread(self._with_pictures, messages, req.thinking)
            else:
                prompt = list(
                    self.tokenizer.apply_chat_template(
                        messages,
                        add_generation_prompt=True,
                        tokenize=True,
                        enable_thinking=req.thinking,
                    )
                )
        except TemplateError as e:
            raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return await self._answer(request, req, prompt, "chat.completion")

    def _with_pictures(self, messages: list[dict], thinking: bool) -> list[int]:
        vision = getattr(self.pair, "vision", None)
        if vision is None:
            raise unsupported("messages", f"{self.model_name} has no vision tower: it cannot read images")
        fetch = fetch_image if self.options.allow_image_urls else None
        try:
            return encode_prompt(
                self.tokenizer, messages, vision=vision, thinking=thinking, fetch=fetch
            )
        except GemmaChatError as e:
            raise ApiError(400, str(e), param="messages") from None

    async def completions(self, request: Request) -> Response:
        req = parse(CompletionRequest, await _json(request))
        self._check_model(req.model)
        given = req.single_prompt()
        if isinstance(given, str):
            self._check_length([given], "prompt")
            prompt = list(self.tokenizer.encode(given))  # with the tokenizer's BOS rule, as --raw
        else:
            vocab = self.pair.target.args.vocab_size
            if any(not 0 <= t < vocab for t in given):
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            prompt = list(given)
        return await self._answer(request, req, prompt, "text_completion")

    # -- one answer --------------------------------------------------------------------------
    async def _answer(self, request: Request, req, prompt: list[int], kind: str) -> Response:
        max_tokens = self._max_tokens(req, len(prompt))
        sampling = Sampling(
            temperature=req.temperature or 0.0,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        stops = req.stop_strings()
        try:
            job = self.scheduler.submit(prompt, sampling, max_tokens)
        except ShuttingDown:
            raise shutting_down() from None
        except Busy:
            raise ApiError(
                429,
                f"the server is busy ({self.scheduler.capacity} requests running or waiting); "
                "try again shortly",
                type="rate_limit_exceeded",
                code="server_busy",
            ) from None
        reply = Reply(self, req, kind, prompt, AnswerText(self.tokenizer, stops))
        if req.stream:
            return EventStream(reply.events(job), lambda: self.scheduler.close(job))
        return await reply.whole(job, request)

    def _check_length(self, texts: list[str], param: str) -> None:
        """A 400 for texts that clearly exceed the context, counted only as far as the context:
        tokenizing a megabyte at once costs many times its size in memory. Texts of fewer
        characters than a quarter of the context cannot exceed it (a character is at most its
        four UTF-8 bytes as tokens) and are left to the exact count."""
        if 4 * sum(len(t) for t in texts) <= self.context_limit:
            return
        left = self.context_limit
        for text in texts:
            left -= count_tokens(self.tokenizer, text, left)
            if left < 0:
                raise ApiError(
                    400,
                    f"the context holds {self.context_limit} tokens; the prompt takes more",
                    param=param,
                    code="context_length_exceeded",
                )

    def _max_tokens(self, req, prompt_tokens: int) -> int:
        room = self.context_limit - 1 - prompt_tokens
        asked = req.requested_max_tokens()
        if room < 1 or (asked is not None and asked > room):
            wanted = "" if asked is None else f" plus {asked} for the answer"
            raise ApiError(
                400,
                f"the context holds {self.context_limit} tokens; the prompt takes "
                f"{prompt_tokens}{wanted}",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(self.options.max_tokens, room)

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server has '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemma-chat",
            "max_model_len": self.context_limit,
            "mtp": self.mtp,
            "input_modalities": ["text", "image"] if getattr(self.pair, "vision", None) else ["text"],
        }


class EventStream(StreamingResponse):
    """Server-sent events that close their job however the response ends. When the client goes
    away, Starlette cancels the streaming task, possibly before the event generator has even
    started (its own `finally` would then never run)."""

    def __init__(self, events: AsyncIterator[str], on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Reply:
    """One request's answer, as OpenAI objects: whole, or as server-sent events."""

    def __init__(self, api: Api, req, kind: str, prompt: list[int], text: AnswerText):
        self.api = api
        self.req = req
        self.kind = kind  # "chat.completion" or "text_completion"
        self.prompt = prompt
        self.text = text
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def pieces(self, job: Job) -> AsyncIterator[Piece]:
        """The answer as it comes; ends at its end or at a stop string."""
        while True:
            event = await job.events.get()
            if event.error:
                job.finished = True
                if event.shutting_down:
                    raise shutting_down()
                raise ApiError(500, event.error, type="server_error")
            job.finished = event.finish_reason is not None
            thinking, text, kept = "", "", []
            for token in event.tokens:
                kept.append(token)
                t, a = self.text.feed(token)
                thinking, text = thinking + t, text + a
                if self.text.stopped:  # the rest of the answer is not wanted
                    break
            finish = "stop" if self.text.stopped else event.finish_reason
            if finish:
                t, a = self.text.finish()
                thinking, text = thinking + t, text + a
            yield Piece(thinking, text, kept, finish, event.stats, event.rows_together)
            if finish:
                return

    async def whole(self, job: Job, request: Request) -> Response:
        gathering = asyncio.ensure_future(self._gather(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({gathering, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            self.api.scheduler.close(job)  # a client that left frees its row now
        if gathering not in done:
            gathering.cancel()
            return Response(status_code=499)  # nobody reads it
        return JSONResponse(gathering.result())

    async def _gather(self, job: Job) -> dict:
        thinking, text, ids, last = "", "", [], None
        async for piece in self.pieces(job):
            thinking += piece.thinking
            text += piece.text
            ids += piece.token_ids
            last = piece
        choice = {"index": 0, "finish_reason": last.finish_reason}
        if self.kind == "chat.completion":
            message = {"role": "assistant", "content": text}
            if thinking:
                message["reasoning_content"] = thinking
            choice["message"] = message
        else:
            choice["text"] = text
        if self.req.return_token_ids:
            choice["token_ids"] = ids
        body = self._envelope(self.kind, [choice], with_prompt=True)
        body["usage"] = self._usage(len(ids), last)
        return body

    async def events(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events (the `EventStream` around them closes the job)."""
        chunk_kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        tokens, last = 0, None
        try:
            if self.kind == "chat.completion":
                first = self._delta({"role": "assistant", "content": ""})
                yield _sse(self._envelope(chunk_kind, [first], with_prompt=True))
            async for piece in self.pieces(job):
                tokens += len(piece.token_ids)
                last = piece
                if not (piece.text or piece.thinking or piece.finish_reason or self.req.return_token_ids):
                    continue
                if self.kind == "chat.completion":
                    delta = {"content": piece.text} if piece.text else {}
                    if piece.thinking:
                        delta["reasoning_content"] = piece.thinking
                    choice = self._delta(delta, piece.finish_reason)
                else:
                    choice = {"index": 0, "text": piece.text, "finish_reason": piece.finish_reason}
                if self.req.return_token_ids:
                    choice["token_ids"] = piece.token_ids
                yield _sse(self._envelope(chunk_kind, [choice]))
            if self.req.include_usage():
                final = self._envelope(chunk_kind, [])
                final["usage"] = self._usage(tokens, last)
                yield _sse(final)
            yield "data: [DONE]\n\n"
        except ApiError as e:  # headers are sent: a last chunk, the error as an event, [DONE]
            thinking, text = self.text.finish()
            if self.kind == "chat.completion":
                delta = {"content": text} if text else {}
                if thinking:
                    delta["reasoning_content"] = thinking
                choice = self._delta(delta, "abort")
            else:
                choice = {"index": 0, "text": text, "finish_reason": "abort"}
            yield _sse(self._envelope(chunk_kind, [choice]))
            yield _sse(e.body())
            yield "data: [DONE]\n\n"

    # -- OpenAI objects ----------------------------------------------------------------------
    def _delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    def _envelope(self, kind: str, choices: list[dict], *, with_prompt: bool = False) -> dict:
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.api.model_name,
            "choices": choices,
        }
        if self.req.return_token_ids and with_prompt:
            body["prompt_token_ids"] = self.prompt
        return body

    def _usage(self, completion_tokens: int, last: Piece) -> dict:
        speculative = {"mtp": self.api.mtp} | {k: last.stats.get(k) for k in SPECULATIVE_FIELDS}
        speculative["rows_together"] = last.rows_together
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(self.prompt) + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.text.thinking_tokens},
            "speculative": speculative,
        }


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="server_shutting_down")


def text_of(content: str | list[dict]) -> str:
    """A message's text, without its pictures' parts."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


async def _json(request: Request):
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
