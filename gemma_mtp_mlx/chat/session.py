"""A conversation: messages, the chat template, and one KV cache carried across turns.

Each turn sends the whole conversation; the engine's `Context` prefills only what follows the
longest common prefix with the tokens it already holds. For that prefix to reach the new turn,
the conversation is kept as the exact tokens the model read and wrote (`_carried`): the earlier
prompt, the answer's own token ids (thinking removed, as the template removes it) and the
template's end of turn. The new user turn is the template's text after the rendered history.
Re-encoding answers from text instead would re-prefill every answer: a model's tokens are not
always the tokenizer's canonical split of their text, and with thinking off the generation
prompt pre-fills an empty thought channel that the template leaves out of earlier turns.

Removing an answer's thinking moves the common prefix back to where that answer began, deeper
than the sliding layers can roll back once their window has wrapped; the session's context keeps
a snapshot there (engine/context.py), so the turn still prefills only what changed. `save` writes
the cache and `_carried` beside the transcript (chat/saved_cache.py), and `_carried` in the
transcript too (chat/transcript.py), so a loaded conversation goes on the same way, with its
cache or without it.

A loaded conversation keeps the newest exchanges that fit the context; they are counted newest
first and only as far as the context (chat/budget.py), so a huge session file is never
tokenized whole.
"""

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..engine.context import Context, PrefillStopped
from ..engine.generate import encode_prompt, generate
from ..engine.stats import GenerationStats
from ..errors import GemmaChatError
from ..images.files import ImageBytes, read_image_file
from ..images.processor import PreparedImage
from ..images.prompt import MAX_IMAGES, ImagePrompt, expand_images, images_of
from ..images.vision import vision_of
from ..models.rollback import DEFAULT_SLACK, max_draft_tokens
from .budget import count_tokens
from .pictures import record, reread
from .saved_cache import CacheRefused, cache_path, read_cache, write_cache
from .thinking import ChannelSplitter, strip_channels
from .transcript import Transcript, is_session, is_text, read_transcript, write_transcript
from .verification import Verification, describe, difference_at, first_difference

_PROBE = "gemma-chat-probe"
# History is dropped to make room for an answer only when less than this is left (or than
# max_tokens, when smaller); otherwise the answer is capped at what is left (`Turn.capped`).
# Reserving all of a large --max-tokens would evict history for room no answer may need.
MIN_ANSWER_ROOM = 256


@dataclass
class Settings:
    """Decoding options; the REPL's slash commands change them between turns."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    mtp: bool = True
    draft_tokens: int | None = None  # None: the engine picks K per round from measured costs
    ignore_eos: bool = False
    think: bool = False

    def decoding(self) -> dict:
        """The keyword arguments `generate` and `generate_batch` take from these settings."""
        return dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            mtp=self.mtp,
            draft_tokens=self.draft_tokens,
            ignore_eos=self.ignore_eos,
        )


@dataclass
class Update:
    thinking: str  # thinking text new in this chunk (shown dimmed, never as channel markers)
    text: str  # answer text new in this chunk
    token_ids: list[int]
    stats: GenerationStats


@dataclass
class Saved:
    path: Path
    messages: int
    cached_tokens: int  # tokens of KV cache saved beside the transcript (0: none)


@dataclass
class Loaded:
    messages: int
    cached_tokens: int  # tokens of KV cache restored (0: the next answer prefills it all)
    refused: str | None  # why a saved KV cache was not used
    dropped: int = 0  # oldest exchanges left out: they do not fit the context
    ids_refused: str | None = None  # why the transcript's token ids were not used
    pictures: list[str] = field(default_factory=list)  # one line per picture left out


class Turn:
    """One answer. Iterate for `Update`s while it streams; `close()` stops it early (the partial
    answer is kept). The fields fill in as it goes. Whoever shows it may set `stop_request`
    (e.g. the REPL's Ctrl-C event): when set during the prefill, the prefill stops at the end of
    its chunk and the answer ends with nothing in it, as if never asked."""

    def __init__(
        self,
        pair,
        prompt: list[int],
        settings: Settings,
        context: Context,
        *,
        max_tokens: int | None = None,
        dropped: int = 0,
        on_end=None,
    ):
        self.pair = pair
        self.prompt = prompt
        self.settings = replace(settings)
        self.context = context
        self.max_tokens = max_tokens or settings.max_tokens
        self.dropped = dropped  # earlier exchanges dropped so that this one fits the context
        self.used_mtp = settings.mtp and pair.drafter is not None
        self._recent_drafts: deque[int] = deque(maxlen=4)  # drafts of the latest rounds
        self.token_ids: list[int] = []
        self.stats: GenerationStats | None = None
        self.finish_reason: str | None = None  # "stop", "length" or "interrupted"
        self.splitter = ChannelSplitter(pair.tokenizer)
        self._on_end = on_end
        self._updates: Iterator[Update] | None = None
        self.stop_request = None

    @property
    def capped(self) -> bool:
        """The context leaves this answer less room than --max-tokens."""
        return self.max_tokens < self.settings.max_tokens

    @property
    def text(self) -> str:
        return self.splitter.answer

    @property
    def thinking(self) -> str:
        return self.splitter.thinking

    @property
    def thinking_tokens(self) -> int:
        return self.splitter.thinking_tokens

    @property
    def draft_now(self) -> int | None:
        """Drafts per round now: the fixed K, or what the engine's policy chose lately (0 when
        it parked drafting; plain rounds that measure the baseline do not count); None before
        the first round or without MTP."""
        if not self.used_mtp:
            return None
        if self.settings.draft_tokens is not None:
            return self.settings.draft_tokens
        recent = list(self._recent_drafts)
        if not recent:
            return None
        if 2 * recent.count(0) > len(recent):
            return 0
        return next(k for k in reversed(recent) if k)

    def __iter__(self) -> Iterator[Update]:
        if self._updates is None:
            self._updates = self._run()
        return self._updates

    def close(self) -> None:
        if self._updates is not None:
            self._updates.close()

    def run(self) -> "Turn":
        """Generate to the end without showing anything."""
        for _ in self:
            pass
        return self

    def _run(self) -> Iterator[Update]:
        self.context.stop_request = self.stop_request
        chunks = generate(
            self.pair,
            self.prompt,
            max_tokens=self.max_tokens,
            context=self.context,
            **self.settings.decoding(),
        )
        try:
            for chunk in chunks:
                self.token_ids += chunk.token_ids
                self.stats = chunk.stats
                if chunk.round is not None and not chunk.round.measuring:
                    self._recent_drafts.append(chunk.round.drafted)
                thinking, text = self.splitter.feed(chunk.token_ids)
                if chunk.finish_reason:
                    more_thinking, more_text = self.splitter.finish()
                    thinking, text = thinking + more_thinking, text + more_text
                    self.finish_reason = chunk.finish_reason
                yield Update(thinking, text, chunk.token_ids, chunk.stats)
        except PrefillStopped:
            # Stopped at a chunk boundary of the prefill: the context holds what it ran, which
            # the next prompt reuses; nothing of this answer exists.
            self._stop()
        except GeneratorExit:
            # Closed between chunks: the cache holds exactly the emitted tokens.
            self._stop()
            raise
        except KeyboardInterrupt:
            # Interrupted inside a round: the cache may hold half of it; start it afresh.
            self.context.reset()
            self._stop()
            raise
        finally:
            chunks.close()
            self.context.stop_request = None
            if self.finish_reason and self._on_end:
                self._on_end(self)

    def _stop(self):
        if self.finish_reason is None:
            self.finish_reason = "interrupted"
            self.splitter.finish()


class Session:
    def __init__(
        self,
        pair,
        settings: Settings | None = None,
        *,
        system: str | None = None,
        model_name: str | None = None,
    ):
        self.pair = pair
        self.settings = settings or Settings()
        self.system = system or None
        self.model_name = model_name or pair.name
        self.messages: list[dict] = []  # user and assistant turns; the system prompt is apart
        # The snapshot lets the next turn drop an answer's thoughts without prefilling it all.
        self.context = Context(
            pair.target, slack=DEFAULT_SLACK, keep_snapshot=True, limit=pair.context_limit
        )
        self.last: Turn | None = None
        self._carried: list[int] | None = None
        self.attached: list[PreparedImage] = []  # pictures for the next message (/image)
        self._pictures: dict[str, PreparedImage] = {}  # the conversation's, by digest
        self._turn_end = self._turn_end_ids()
        self._check_draft_tokens(self.settings.draft_tokens)

    # -- state ---------------------------------------------------------------------------------
    @property
    def has_drafter(self) -> bool:
        return self.pair.drafter is not None

    @property
    def mtp_on(self) -> bool:
        return self.settings.mtp and self.has_drafter

    def mtp_state(self) -> str:
        if not self.has_drafter:
            return "MTP off (no drafter)"
        k = self.settings.draft_tokens
        if not self.settings.mtp:
            return "MTP off"
        if k is None:
            return "MTP on, K auto (chosen per round from measured costs)"
        return "MTP parked (K = 0)" if k == 0 else f"MTP on, K = {k}"

    @property
    def takes_pictures(self) -> bool:
        return getattr(self.pair, "vision", None) is not None

    @property
    def context_used(self) -> int:
        return len(self.context.tokens)

    @property
    def context_limit(self) -> int:
        return self.context.limit

    def reset(self) -> None:
        self.messages = []
        self._carried = None
        self.last = None
        self.attached, self._pictures = [], {}
        self.context.reset()

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self._carried = None

    def set_think(self, on: bool) -> None:
        if on != self.settings.think:
            self.settings.think = on
            self._carried = None  # the system turn says whether thinking is on

    def set_mtp(self, value: str) -> str:
        """`on`, `off`, `auto` (K per round from measured costs) or a fixed draft length K
        (0 parks drafting); returns what is now in effect."""
        value = value.strip().lower()
        if value not in ("on", "off", "auto") and not value.isdigit():
            raise GemmaChatError("usage: /mtp on|off|auto|K (K drafts per round, 0 parks drafting)")
        if value != "off" and not self.has_drafter:
            raise GemmaChatError("no drafter is loaded (started with --no-mtp, or none found)")
        if value.isdigit():
            self._check_draft_tokens(int(value))
            self.settings.draft_tokens = int(value)
        elif value == "auto":
            self.settings.draft_tokens = None
        self.settings.mtp = value != "off"
        return self.mtp_state()

    def _check_draft_tokens(self, k: int | None) -> None:
        if k is not None and k > max_draft_tokens(self.context.slack):
            raise GemmaChatError(f"at most {max_draft_tokens(self.context.slack)} draft tokens")

    # -- pictures ------------------------------------------------------------------------------
    def attach(self, image: str | ImageBytes) -> PreparedImage:
        """Read a picture (a path, or a file's bytes) for the next message."""
        vision = vision_of(self.pair)
        if len(self.attached) >= MAX_IMAGES:
            raise GemmaChatError(f"at most {MAX_IMAGES} images in one message")
        prepared = vision.prepare(read_image_file(image) if isinstance(image, str) else image)
        self.attached.append(prepared)
        return prepared

    def _expand(self, ids: list[int], messages: list[dict]) -> list[int]:
        """`ids` with the pictures of `messages` (in order) in place of the template's image
        tokens."""
        pictures = [self._pictures[p["sha256"]] for m in messages for p in m.get("images", ())]
        if not pictures:
            return ids
        vision = vision_of(self.pair)
        return expand_images(ids, pictures, vision.marks, vision.encode)

    # -- turns ---------------------------------------------------------------------------------
    def ask(self, text: str) -> Turn:
        """The next answer, to be iterated. Drops the oldest exchanges (keeping the system
        prompt) when the conversation leaves too little room for an answer (MIN_ANSWER_ROOM);
        the answer gets the room that is left up to max_tokens. Pictures attached since the
        last message go with this one."""
        text = _valid(text).strip() if self.attached else _message(text)
        user = {"role": "user", "content": text}
        if self.attached:
            user["images"] = [record(p) for p in self.attached]
            self._pictures.update((p.digest, p) for p in self.attached)
        limit = self.context.limit
        room = min(self.settings.max_tokens, MIN_ANSWER_ROOM)
        history, carried, dropped = list(self.messages), self._carried, 0
        while True:
            prompt = self._prompt(history, user, carried)
            if len(prompt) + room < limit or not history:
                break
            history, carried, dropped = _drop_oldest(history), None, dropped + 1
        if len(prompt) >= limit - 1:
            raise GemmaChatError(
                f"this message takes {len(prompt)} tokens with the chat template; "
                f"the context holds {limit}"
            )
        if dropped:
            self.messages, self._carried = history, None
        self.attached = []
        return Turn(
            self.pair,
            prompt,
            self.settings,
            self.context,
            max_tokens=min(self.settings.max_tokens, limit - 1 - len(prompt)),
            dropped=dropped,
            on_end=lambda turn: self._end(user, turn),
        )

    def single_prompt(self, text: str) -> list[int]:
        """A one-message conversation (with the system prompt), encoded as a first `ask` would."""
        return self._prompt([], {"role": "user", "content": text.strip()}, None)

    def complete(self, text: str) -> Turn:
        """A raw completion of `text` (no chat template), outside the conversation."""
        prompt = list(self.pair.tokenizer.encode(_valid(text)))
        limit = self.context.limit
        if len(prompt) >= limit - 1:
            raise GemmaChatError(f"the prompt is {len(prompt)} tokens; the context holds {limit}")
        return Turn(
            self.pair,
            prompt,
            self.settings,
            self.context,
            max_tokens=min(self.settings.max_tokens, limit - 1 - len(prompt)),
        )

    def _end(self, user: dict, turn: Turn) -> None:
        if turn.finish_reason == "interrupted" and not turn.token_ids:
            return  # stopped before a word: as if never asked
        self.messages += [user, {"role": "assistant", "content": turn.text.strip()}]
        ids = turn.token_ids
        if turn.finish_reason == "stop":
            ids = ids[:-1]  # the end-of-sequence token; the template's end of turn replaces it
        body = strip_channels(ids, turn.splitter.open_id, turn.splitter.close_id)
        self._carried = None if self._turn_end is None else turn.prompt + body + self._turn_end
        self.last = turn

    def _render(self, messages: list[dict], *, generation: bool) -> str:
        tokenizer = self.pair.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise GemmaChatError("this tokenizer has no chat template; use --raw")
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        full = [_template_message(m) for m in full]
        return tokenizer.apply_chat_template(
            full,
            add_generation_prompt=generation,
            tokenize=False,
            enable_thinking=self.settings.think,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.pair.tokenizer.encode(text, add_special_tokens=False))

    def _prompt(self, history: list[dict], user: dict, carried: list[int] | None) -> list[int]:
        full = self._render(history + [user], generation=True)
        if carried is not None and history:
            before = self._render(history, generation=False)
            if full.startswith(before):
                return carried + self._expand(self._encode(full[len(before) :]), [user])
        return self._expand(self._encode(full), history + [user])

    def _turn_end_ids(self) -> list[int] | None:
        """The tokens the template closes a model turn with (Gemma 4: `<turn|>\\n`)."""
        try:
            text = self._render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                generation=False,
            )
        except Exception:  # a template that cannot render this: no carrying, full prefills
            return None
        i = text.rfind(_PROBE)
        return self._encode(text[i + len(_PROBE) :]) if i >= 0 else None

    # -- /verify -------------------------------------------------------------------------------
    def verify(self) -> Verification:
        """Replay the last answer by plain greedy decoding and compare the token ids. The
        replay has a cache of its own: rolling the conversation's back over a long answer would
        empty it once the sliding window has wrapped, and the next turn would prefill it all."""
        last = self.last
        if last is None:
            raise GemmaChatError("nothing to verify yet: ask something first")
        n = len(last.token_ids)
        if last.settings.temperature > 0:
            return Verification(
                None,
                n,
                f"the last answer was sampled (temperature {last.settings.temperature:g}): MTP "
                "keeps every token distributed exactly as the target's, but a sampled answer is "
                "not token-identical to a replay; /verify compares greedy answers (--temp 0)",
            )
        replay_context = Context(self.pair.target, slack=DEFAULT_SLACK, limit=self.context.limit)
        replay = [
            t
            for chunk in generate(
                self.pair,
                last.prompt,
                max_tokens=n,
                mtp=False,
                ignore_eos=last.settings.ignore_eos,
                context=replay_context,
            )
            for t in chunk.token_ids
        ]
        first = first_difference(last.token_ids, replay)
        how = "with MTP" if last.used_mtp else "without MTP"
        if first is None:
            message = f"identical: all {n} tokens of the last answer ({how}) match plain decoding"
            return Verification(True, n, message)
        # The target's logits where they part, from a one-token step after the common prefix
        # (the replay's context holds it: the prefill rolls back to it and runs one token).
        prompt = encode_prompt(self.pair.tokenizer, last.prompt)
        logits, _, _ = replay_context.prefill(prompt + replay[:first])
        difference = difference_at(first, last.token_ids, replay, logits[0, -1])
        message = describe(difference, n, how, lambda t: self.pair.tokenizer.decode([t]))
        return Verification(False, n, message, difference)

    # -- /save and /load -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, replace: bool = False) -> Saved:
        """Write the transcript to `path` and the KV cache beside it (chat/saved_cache.py), each
        atomically and private. The cache first: a save killed between the two leaves a cache
        whose transcript digest no longer matches, which a load refuses. A file at `path` that
        is not a session is replaced only when `replace` says so."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise GemmaChatError(f"cannot write {path}: it is a folder")
        if not replace and path.exists() and not is_session(path):
            raise GemmaChatError(
                f"{path} exists and is not a gemma-chat session; /save! {path} replaces it"
            )
        transcript = Transcript(
            self.system, self.settings.think, self.messages, self.model_name, self._carried
        )
        kv = cache_path(path)
        self._keep_only_what_the_next_turn_reuses()
        if self.context.tokens:
            write_cache(
                kv,
                self.context,
                self._carried,
                self.pair,
                model_name=self.model_name,
                transcript_digest=transcript.digest(),
            )
        else:
            try:
                kv.unlink(missing_ok=True)  # an older save's cache would not match anyway
            except OSError:
                pass  # writing the transcript beside it reports what is wrong with the folder
        write_transcript(path, transcript)
        return Saved(path, len(self.messages), len(self.context.tokens))

    def load(self, path: str | os.PathLike) -> Loaded:
        """Replace the conversation by a saved one, with its KV cache when one was saved for
        this model and this transcript; otherwise the next answer prefills the conversation:
        its saved token ids, or else its text, of which only the newest exchanges that fit the
        context are kept."""
        path = Path(path).expanduser()
        transcript = read_transcript(path)
        digest = transcript.digest()
        ids = self._usable_ids(transcript)
        messages, dropped = transcript.messages, 0
        if ids is None:
            messages, dropped = self._fitting(transcript.system, transcript.messages)
        self.system, self.messages = transcript.system, messages
        if transcript.think is not None:
            self.settings.think = transcript.think
        self._carried, self.last = None, None
        self.attached, self._pictures = [], {}
        left_out = self._find_pictures()
        self.context.reset()
        refused = None
        kv = cache_path(path)
        if dropped:
            refused = "the conversation was cut to fit the context" if kv.is_file() else None
        elif kv.is_file() and left_out:
            refused = "it holds a picture that is left out"
        elif kv.is_file():
            try:
                saved = read_cache(kv, self.pair, self.context.slack, digest, self.context.limit)
            except CacheRefused as e:
                refused = str(e)
            else:
                self.context.cache, self.context.tokens = saved.cache, saved.tokens
                self._carried = saved.carried
        if self._carried is None:
            self._carried = ids  # the very tokens a cache would have held
        self._carried = self._placing_pictures(self._carried, left_out)
        if self._carried is not None:  # the cache holds these pictures where they are
            held = len(self.context.tokens)
            self.context.images = [b for b in images_of(self._carried) if b[0] < held]
        return Loaded(
            len(self.messages), len(self.context.tokens), refused, dropped,
            transcript.ids_refused, left_out,
        )

    def _usable_ids(self, transcript: Transcript) -> list[int] | None:
        """The transcript's token ids, when they fit this model's vocabulary and context."""
        ids = transcript.token_ids
        vocab = self.pair.target.args.vocab_size
        if ids is None or len(ids) >= self.context.limit or any(t >= vocab for t in ids):
            return None
        return ids

    def _fitting(self, system: str | None, messages: list[dict]) -> tuple[list[dict], int]:
        """The newest exchanges whose text fits the context, and how many older ones do not.
        Counted newest first, each text only as far as the room left, so that a huge message is
        never tokenized whole; the template's few tokens per turn are left to `ask`."""
        tokenizer, left = self.pair.tokenizer, self.context.limit
        if system:
            left -= count_tokens(tokenizer, system, left)
        start = len(messages)
        while start >= 2 and left >= 0:
            for m in messages[start - 2 : start]:
                left -= count_tokens(tokenizer, m["content"], max(left, 0))
            if left >= 0:
                start -= 2
        return messages[start:], start // 2

    def _find_pictures(self) -> list[str]:
        """Read again the pictures a loaded transcript names; each one missing, changed or
        unreadable leaves its message (one line each says so)."""
        notes = []
        for message in self.messages:
            kept = []
            for entry in message.get("images", ()):
                vision = getattr(self.pair, "vision", None)
                if vision is None:
                    image, why = None, f"{self.pair.name} cannot read images: {entry['path']} is left out"
                else:
                    image, why = reread(entry, vision)
                if image is None:
                    notes.append(why)
                    continue
                self._pictures[image.digest] = image
                kept.append(entry)
            if "images" in message:
                message["images"] = kept
                if not kept:
                    del message["images"]
        return notes

    def _placing_pictures(self, ids: list[int] | None, left_out: list[str]) -> list[int] | None:
        """Saved token ids with the conversation's pictures placed in them (an `ImagePrompt`),
        so that a prefill of them reads the pictures, not their placeholder tokens; None when
        they cannot be placed (a picture left out, ids that do not hold them): the
        conversation is then encoded again from its messages."""
        pictures = [self._pictures[p["sha256"]] for m in self.messages for p in m.get("images", ())]
        if ids is None or not (pictures or left_out):
            return ids
        if left_out:
            return None
        marks, spans, at = vision_of(self.pair).marks, [], 0
        for picture in pictures:
            n = picture.tokens
            found = next(
                (i for i in range(at, len(ids) - n - 1)
                 if ids[i] == marks.begin and ids[i + n + 1] == marks.end
                 and all(t == marks.image for t in ids[i + 1 : i + n + 1])),
                None,
            )
            if found is None:
                return None
            spans.append(found + 1)
            at = found + n + 2
        vision = vision_of(self.pair)
        return ImagePrompt(ids, pictures, spans, vision.marks, vision.encode)

    def _keep_only_what_the_next_turn_reuses(self) -> None:
        """Roll the cache back to where it parts from the conversation's tokens: the last
        answer's thoughts and its newest token, which the next turn drops anyway (through the
        snapshot), so a saved cache holds just what a resumed turn reuses."""
        if self._carried is None:
            return
        held = self.context.tokens
        common = 0
        for a, b in zip(held, self._carried):
            if a != b:
                break
            common += 1
        self.context.rewind(len(held) - common)


def _message(text: str) -> str:
    text = _valid(text).strip()
    if not text:
        raise GemmaChatError("empty message")
    return text


def _valid(text: str) -> str:
    if not is_text(text):
        raise GemmaChatError("the message is not valid text (it holds undecodable bytes)")
    return text


def _template_message(message: dict) -> dict:
    """A message as the chat template takes it: its pictures as image parts before its text."""
    if not message.get("images"):
        return {"role": message["role"], "content": message["content"]}
    parts = [{"type": "image"} for _ in message["images"]]
    return {"role": message["role"], "content": [*parts, {"type": "text", "text": message["content"]}]}


def _drop_oldest(history: list[dict]) -> list[dict]:
    """History without its first exchange: the first message and anything up to the next user."""
    rest = history[1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest
