"""`gemma-chat --endpoint URL`: the same chat against any OpenAI-compatible server (our own
`serve`, `mlx_lm.server`, Ollama, vLLM on a GPU box), through the official `openai` client.

`RemoteSession` and `RemoteTurn` offer what the CLI and the REPL use of `chat.session`'s
`Session` and `Turn` (ask, stream updates, close, the figures), so one-shots, scripted and
interactive chats run unchanged; the conversation is kept here and sent whole each turn.

Figures: tokens per second are measured here, from the first streamed token to the last, with
the token count the server gives (the ids it streams, where it does, else its final `usage`).
Speculative statistics come only from the server: our `serve` reports its own in
`usage.speculative` (acceptance, tokens per target forward, speedup against its measured plain
baseline); vLLM's spec-decode counters on `/metrics` give acceptance and tokens per forward
(no baseline, so no speedup); anything else reports none, and the meter says so.

Waiting: a server that cannot be reached is given CONNECT_TIMEOUT_S; one that accepts and then
says nothing, `timeout` seconds (--timeout) before the first token and between tokens. Until
the first token the meter says the chat is waiting for the server, and Ctrl-C ends the wait at
once (there is no local cache to keep consistent: the server frees the answer's row when the
connection goes). A server whose answers are not OpenAI's (an HTML page, a proxy's text) is
said to be so in one line.
"""

import time
from dataclasses import dataclass, replace

import openai
from rich.text import Text

from ..chat.session import Settings, Update
from ..errors import GemmaChatError
from ..images.files import ImageBytes, data_url, decode, read_image_file
from .vllm_metrics import SpecCounters, spec_counters

OURS, VLLM, OTHER = "gemma-chat", "vllm", "other"  # what /v1/models' `owned_by` says
CONNECT_TIMEOUT_S = 5.0
FIRST_TOKEN_TIMEOUT_S = 60.0  # a long prompt's prefill on a busy server takes tens of seconds
NOT_REPORTED = "speculative statistics not reported by the server"
clock = time.perf_counter


def api_base(url: str) -> str:
    """The OpenAI base url (…/v1) of a server given with or without its /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class ServerFigures:
    """Speculative statistics of one answer, as the server reports them."""

    source: str  # where they come from, as the meter names it
    drafted: int
    accepted: int
    acceptance_rate: float | None
    mean_accepted_length: float | None  # tokens per target forward
    speedup: float | None = None  # against the server's measured plain decoding
    baseline_tokens_per_second: float | None = None
    server_tokens_per_second: float | None = None

    @classmethod
    def from_usage(cls, spec: dict) -> "ServerFigures":
        return cls(
            "gemma-chat serve",
            spec.get("drafted") or 0,
            spec.get("accepted") or 0,
            spec.get("acceptance_rate"),
            spec.get("mean_accepted_length"),
            spec.get("speedup"),
            spec.get("baseline_tokens_per_second"),
            spec.get("tokens_per_second"),
        )

    @classmethod
    def from_vllm(cls, during: SpecCounters) -> "ServerFigures":
        return cls(
            "vLLM /metrics, the whole server during this answer",
            int(during.drafted),
            int(during.accepted),
            during.accepted / during.drafted if during.drafted else None,
            # vLLM's mean acceptance length: tokens per verify round, the bonus token included
            1 + during.accepted / during.drafts if during.drafts else None,
        )


class RemoteStats:
    """What the CLI and the meter read of an answer's `GenerationStats`, for a remote answer."""

    def __init__(self):
        self.prompt_tokens: int | None = None
        self.generated_tokens = 0
        self.first_at: float | None = None  # the first token arrived (perf_counter)
        self.last_at: float | None = None
        self.first_tokens = 0  # tokens in the first chunk (not part of the decode rate)
        self.server: ServerFigures | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return None
        after_first = self.generated_tokens - self.first_tokens
        return after_first / (self.last_at - self.first_at) if after_first > 0 else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.server.acceptance_rate if self.server else None

    @property
    def mean_accepted_length(self) -> float | None:
        return self.server.mean_accepted_length if self.server else None

    @property
    def speedup(self) -> float | None:
        return self.server.speedup if self.server else None

    @property
    def baseline_tokens_per_second(self) -> float | None:
        return self.server.baseline_tokens_per_second if self.server else None

    def as_dict(self) -> dict:
        tps = self.tokens_per_second
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "tokens_per_second": None if tps is None else round(tps, 2),
            "server": None if self.server is None else vars(self.server),
        }


class RemoteSession:
    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        model: str | None = None,
        api_key: str | None = None,
        system: str | None = None,
        timeout: float = FIRST_TOKEN_TIMEOUT_S,
    ):
        self.url = url
        self.timeout = timeout
        self.settings = settings
        self.system = system or None
        self.messages: list[dict] = []
        self.last: RemoteTurn | None = None
        self.context_used = 0  # tokens of the latest exchange, as the server counted them
        # No key given: send a placeholder, never the user's OPENAI_API_KEY to another server.
        self.client = openai.OpenAI(
            base_url=api_base(url),
            api_key=api_key or "none",
            max_retries=0,
            timeout=openai.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
        )
        card = self._model_card(model)
        self.model_name = card.id
        self.kind = {OURS: OURS, VLLM: VLLM}.get(getattr(card, "owned_by", None), OTHER)
        extra = card.model_extra or {}
        self.context_limit: int | None = extra.get("max_model_len")
        self.server_mtp: bool | None = extra.get("mtp") if self.kind == OURS else None
        # Servers that say what their model reads (ours, OpenRouter's style) are believed.
        modalities = extra.get("input_modalities")
        self.takes_pictures = not isinstance(modalities, list) or "image" in modalities
        self.attached: list[ImageBytes] = []  # pictures for the next message, sent as data: URLs

    def _model_card(self, wanted: str | None):
        try:
            cards = list(self.client.models.list())
        except openai.OpenAIError as e:
            if wanted is None or not isinstance(e, openai.APIStatusError):
                raise remote_error(e, self, "/v1/models") from None
            cards = []  # it cannot list its models; trust the name given
        except (AttributeError, TypeError, ValueError):  # the client could not read the body
            raise not_openai(self.url, "/v1/models") from None
        if not all(isinstance(getattr(c, "id", None), str) for c in cards):
            raise not_openai(self.url, "/v1/models")
        if wanted is not None:
            return next((c for c in cards if c.id == wanted), None) or openai.types.Model(
                id=wanted, object="model", created=0, owned_by="unknown"
            )
        if len(cards) != 1:
            names = ", ".join(c.id for c in cards) or "none"
            raise GemmaChatError(
                f"{self.url} serves {len(cards)} models ({names}): name one with --model"
            )
        return cards[0]

    # -- what the REPL shows and changes -----------------------------------------------------
    def mtp_state(self) -> str:
        if self.kind == OURS:
            return f"MTP {'on' if self.server_mtp else 'off'} at {self.url}"
        if self.kind == VLLM:
            return f"vLLM at {self.url} (its speculative decoding, if configured)"
        return f"served by {self.url}"

    def set_mtp(self, value: str) -> str:
        raise GemmaChatError("MTP is set where the model runs: on the server (--endpoint)")

    def set_think(self, on: bool) -> None:
        self.settings.think = on

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def reset(self) -> None:
        self.messages, self.last, self.context_used = [], None, 0
        self.attached = []

    def attach(self, image: str | ImageBytes) -> ImageBytes:
        """A picture for the next message, checked here (a bad file is one line, not the
        server's refusal) and sent as a data: URL."""
        if not self.takes_pictures:
            raise GemmaChatError(f"{self.model_name} at {self.url} does not read images")
        picture = read_image_file(image) if isinstance(image, str) else image
        decode(picture)
        self.attached.append(picture)
        return picture

    def verify(self):
        raise GemmaChatError(
            "/verify replays an answer with the model loaded here; with --endpoint the model "
            "runs on the server"
        )

    def save(self, path, *, replace: bool = False):
        raise GemmaChatError("/save and /load keep local conversations; not with --endpoint yet")

    def load(self, path):
        return self.save(path)

    # -- turns -------------------------------------------------------------------------------
    def ask(self, text: str) -> "RemoteTurn":
        text = text.strip()
        if not text and not self.attached:
            raise GemmaChatError("empty message")
        user = {"role": "user", "content": text}
        if self.attached:
            parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in self.attached]
            user["content"] = [*parts, {"type": "text", "text": text}]
            self.attached = []
        system = [{"role": "system", "content": self.system}] if self.system else []
        return RemoteTurn(self, {"messages": system + self.messages + [user]}, user)

    def complete(self, text: str) -> "RemoteTurn":
        """A raw completion of `text` (/v1/completions), outside the conversation."""
        return RemoteTurn(self, {"prompt": text}, None)

    def _end(self, user: dict | None, turn: "RemoteTurn") -> None:
        if user is not None and (turn.finish_reason != "interrupted" or turn.text):
            self.messages += [user, {"role": "assistant", "content": turn.text.strip()}]
        if turn.stats.prompt_tokens is not None:
            self.context_used = turn.stats.prompt_tokens + turn.stats.generated_tokens
        self.last = turn

    def request_options(self) -> dict:
        """Sampling and extensions, each sent only to servers that honour it."""
        s = self.settings
        options = {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
        if s.seed is not None:
            options["seed"] = s.seed
        extra = {}
        if s.top_k:
            extra["top_k"] = s.top_k  # vLLM, mlx_lm.server, ours
        if s.think:
            extra["chat_template_kwargs"] = {"enable_thinking": True}
        if self.kind in (OURS, VLLM):
            extra["return_token_ids"] = True
            if s.ignore_eos:
                extra["ignore_eos"] = True
        elif s.ignore_eos:
            raise GemmaChatError("--ignore-eos needs a server that honours it (gemma-chat serve, vLLM)")
        if extra:
            options["extra_body"] = extra
        return options

    def spec_counters(self) -> SpecCounters | None:
        if self.kind != VLLM:
            return None
        try:
            page = self.client.get(self.url.rstrip("/").removesuffix("/v1") + "/metrics", cast_to=str)
        except openai.OpenAIError:
            return None
        return spec_counters(page)


class RemoteTurn:
    """One answer from the server. Iterate for `Update`s while it streams; `close()` stops it
    (the server frees the answer's row when the connection goes)."""

    stops_at_once = True  # Ctrl-C need not wait for a consistent point (chat/repl.py)

    def __init__(self, session: RemoteSession, body: dict, user: dict | None):
        self.session = session
        self.body = body
        self.user = user
        self.settings = replace(session.settings)
        self.max_tokens = self.settings.max_tokens
        self.dropped = 0  # the server, not this side, decides what fits its context
        self.capped = False  # and how long an answer may be
        self.used_mtp = False  # no local drafting: the figures are the server's
        self.draft_now = None
        self.text = ""
        self.thinking = ""
        self.thinking_tokens = 0
        self.token_ids: list[int] | None = None  # only when the server sends them
        self.finish_reason: str | None = None
        self.stats = RemoteStats()
        self._updates = None
        self._stream = None
        self._text_started = False  # leading blank lines are not shown, as in the local chat
        self._settled = False  # the stream is over: what the server reported is all there is

    def __iter__(self):
        if self._updates is None:
            self._updates = self._run()
        return self._updates

    def run(self) -> "RemoteTurn":
        for _ in self:
            pass
        return self

    def close(self) -> None:
        if self._updates is not None:
            self._updates.close()

    def _run(self):
        session, before = self.session, self.session.spec_counters()
        options = session.request_options() | self.body
        endpoint = session.client.chat.completions if "messages" in self.body else session.client.completions
        try:
            self._stream = endpoint.create(
                model=session.model_name,
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
            chunks = 0
            for chunk in self._stream:
                chunks += 1
                update = self._take(chunk)
                if update is not None:
                    yield update
            if not chunks:  # a body with no server-sent events in it
                raise not_openai(session.url, self._path)
        except openai.OpenAIError as e:
            raise remote_error(e, session, "the answer") from None
        except (AttributeError, TypeError, ValueError):  # events that are not OpenAI chunks
            raise not_openai(session.url, self._path) from None
        except (GeneratorExit, KeyboardInterrupt):  # closed, or Ctrl-C: the partial answer stays
            self.finish_reason = self.finish_reason or "interrupted"
            raise
        finally:
            if self._stream is not None:
                self._stream.close()
            self._settle(before)

    @property
    def _path(self) -> str:
        return "/v1/chat/completions" if "messages" in self.body else "/v1/completions"

    def _take(self, chunk) -> Update | None:
        if chunk.usage is not None:
            self._usage(chunk.usage)
        if not chunk.choices:
            return None
        choice = chunk.choices[0]
        extra = choice.model_extra or {}
        if "messages" in self.body:
            delta = choice.delta
            text = delta.content or ""
            more = delta.model_extra or {}
            thinking = more.get("reasoning_content") or more.get("reasoning") or ""
        else:
            text, thinking = choice.text or "", ""
        ids = extra.get("token_ids") or []
        if not self._text_started:
            text = text.lstrip()
            self._text_started = bool(text)
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        if not (text or thinking or ids):
            return None
        now, stats = clock(), self.stats
        if ids:
            self.token_ids = (self.token_ids or []) + ids
            stats.generated_tokens = len(self.token_ids)
        if stats.first_at is None:
            stats.first_at = now
            # A server that streams no ids sends one token per chunk: the first is one token.
            stats.first_tokens = len(ids) or 1
        stats.last_at = now
        self.text += text
        self.thinking += thinking
        return Update(thinking, text, ids, stats)

    def _usage(self, usage) -> None:
        stats = self.stats
        stats.prompt_tokens = usage.prompt_tokens
        stats.generated_tokens = usage.completion_tokens
        details = usage.completion_tokens_details
        if details is not None and details.reasoning_tokens:
            self.thinking_tokens = details.reasoning_tokens
        spec = (usage.model_extra or {}).get("speculative")
        if isinstance(spec, dict):
            stats.server = ServerFigures.from_usage(spec)

    def _settle(self, before: SpecCounters | None) -> None:
        self._settled = True
        if before is not None:
            after = self.session.spec_counters()
            if after is not None:
                self.stats.server = ServerFigures.from_vllm(after - before)
        if self.finish_reason is not None:
            self.session._end(self.user, self)

    # -- figures, as the CLI and the REPL show them --------------------------------------------
    def _figures(self) -> list[str]:
        """The server's speculative statistics, named as its own."""
        server = self.stats.server
        if server is None:
            return [NOT_REPORTED]
        if not server.drafted:
            return [f"{server.source}: nothing drafted"]
        parts = []
        if server.acceptance_rate is not None:
            parts.append(f"accepted {server.acceptance_rate:.0%}")
        if server.mean_accepted_length:
            parts.append(f"{server.mean_accepted_length:.2f} tok/forward")
        if server.speedup:
            parts.append(
                f"{server.speedup:.2f}× vs its measured plain {server.baseline_tokens_per_second:.1f} tok/s"
            )
        else:
            parts.append("no speedup reported")
        return [f"{server.source}: " + " · ".join(parts)]

    def meter(self) -> Text:
        """The REPL's meter line for this answer."""
        if not self._settled and self.stats.first_at is None:
            return Text("waiting for the server… (Ctrl-C stops)", style="dim")
        tps = self.stats.tokens_per_second
        parts = [f"{tps:.1f} tok/s measured here" if tps else "– tok/s"]
        if self._settled or self.stats.server is not None:
            parts += self._figures()
        if self.thinking_tokens:
            parts.append(f"thinking {self.thinking_tokens} tok")
        if self.session.context_limit:
            parts.append(f"context {self.session.context_used:,}/{self.session.context_limit:,}")
        return Text(" · ".join(parts), style="dim")

    def summary(self) -> str:
        """The one-shot's stderr line."""
        stats = self.stats
        parts = [f"{stats.generated_tokens} tokens"]
        if stats.tokens_per_second:
            parts.append(f"{stats.tokens_per_second:.1f} tok/s measured here")
        parts += self._figures()
        if stats.prompt_tokens is not None:
            parts.append(f"prompt {stats.prompt_tokens} tokens")
        return " · ".join(parts)

    def stats_rows(self) -> list[tuple[str, str]]:
        """The REPL's /stats table."""
        stats, server = self.stats, self.stats.server
        tps = stats.tokens_per_second
        rows = [
            ("answer", f"{stats.generated_tokens} tokens, {self.finish_reason}"),
            ("server", f"{self.session.url} · {self.session.model_name}"),
            ("decode", f"{tps:.1f} tok/s measured here" if tps else "–"),
        ]
        if stats.prompt_tokens is not None:
            rows.append(("prompt", f"{stats.prompt_tokens} tokens"))
        if server is None:
            rows.append(("speculative", NOT_REPORTED))
            return rows
        rows.append(("reported by", server.source))
        rows.append(("drafted", f"{server.drafted}, {server.accepted} accepted"))
        if server.acceptance_rate is not None:
            rows.append(("acceptance", f"{server.acceptance_rate:.1%}"))
        if server.mean_accepted_length:
            rows.append(("per forward", f"{server.mean_accepted_length:.2f} tokens"))
        if server.server_tokens_per_second:
            rows.append(("server decode", f"{server.server_tokens_per_second:.1f} tok/s"))
        if server.speedup:
            rows.append(("speedup", f"{server.speedup:.2f}× vs plain {server.baseline_tokens_per_second:.1f} tok/s, measured there"))
        return rows


def remote_error(e: openai.OpenAIError, session: RemoteSession, what: str) -> GemmaChatError:
    """One line for a failed request."""
    url = session.url
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message") or e.message
        return GemmaChatError(f"{url} refused {what} ({e.status_code}): {message}")
    if isinstance(e, openai.APITimeoutError):
        # The client's transport names its timeouts by phase (httpx's ConnectTimeout, ReadTimeout).
        if "Connect" in type(e.__cause__).__name__:
            return GemmaChatError(f"cannot reach {url}: no connection within {CONNECT_TIMEOUT_S:g} s")
        return GemmaChatError(f"{url} sent nothing for {session.timeout:g} s (--timeout)")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return GemmaChatError(f"cannot reach {url}: {cause}")
    return GemmaChatError(f"{url}: {e}")


def not_openai(url: str, path: str) -> GemmaChatError:
    return GemmaChatError(f"the server's answer to {path} is not an OpenAI-compatible response ({url})")
