"""The one thread that owns the model: it admits up to B answers into a `Decoder`, steps them
together (one target forward verifies every row's drafts: the weights, and a MoE's experts, are
read once per round for the batch) and hands each answer its tokens. More requests wait in line,
up to a bound; past it `submit` refuses.

MLX evaluation is not thread-safe, so every model call happens on this thread. The HTTP side runs
on an asyncio loop: it submits a `Job` and reads `Event`s from the job's asyncio queue, which
this thread fills through `loop.call_soon_threadsafe`. Tokenising and detokenising stay on the
loop's side (the tokenizer is not shared across threads either). A request that ends before its
answer does (client gone, a stop string) closes its job, and this thread drops the row before
the next round.

One request's failure is its own: a prompt that cannot be admitted, or a row whose work fails
inside a shared round (engine/isolation.py), ends its own answer with an error; the others go
on. Shutting down (`drain`) stops admitting at once, ends the requests still in line, and gives
the answers under way a grace period before ending them too.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import isolation
from ..engine.decode import Decoder, Emitted, Stream
from ..engine.generate import make_sampler
from ..errors import GemmaChatError

log = logging.getLogger("gemma_chat.serve")


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Event:
    """What one round gave one answer."""

    tokens: list[int]
    finish_reason: str | None = None  # "stop" (end of sequence) or "length" on the last event
    stats: dict = field(default_factory=dict)  # the answer's GenerationStats.as_dict() so far
    rows_together: int = 1  # the most answers decoded in one round with this one, so far
    error: str | None = None  # the engine could not go on with this answer
    shutting_down: bool = False  # the error is the server's shutdown, not the engine's


SHUTTING_DOWN = "the server is shutting down"


class Job:
    def __init__(self, prompt: list[int], sampling: Sampling, max_tokens: int):
        self.prompt = prompt
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False  # the engine is done with it (set by the reader of the events)
        self.closed = False
        self.rows_together = 1  # kept by the decoding thread
        self._loop = asyncio.get_running_loop()

    def deliver(self, event: Event) -> None:
        """From the decoding thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


class Busy(Exception):
    """Every slot and every place in line is taken."""


class ShuttingDown(Exception):
    """The server is shutting down: it admits nothing more."""


class Scheduler:
    def __init__(
        self,
        pair,
        *,
        batch: int,
        queue_limit: int,
        mtp: bool,
        draft_tokens: int | None,
        debug: bool = False,
    ):
        self.pair = pair
        self.batch = batch
        self.capacity = batch + queue_limit
        self.mtp = mtp
        self.draft_tokens = draft_tokens
        self.debug = debug  # tracebacks of engine failures in the log
        self.decoder = Decoder(pair, mtp=mtp, draft_tokens=draft_tokens)  # checks draft_tokens now
        self.open = 0  # jobs submitted and not closed yet (touched on the loop's thread only)
        self.draining = False  # set on the loop's thread by `drain`
        self._loop: asyncio.AbstractEventLoop | None = None  # the HTTP side's, once started
        # Answers being decoded and jobs waiting for a slot, for /health: written by the decoding
        # thread before it hands out the tokens that follow each change.
        self.running = 0
        self.waiting = 0
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gemma-chat-decoder", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def drain_soon(self, grace: float) -> None:
        """`drain` from any thread, or from a signal handler (nothing here takes a lock); before
        the start there is nothing to drain."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.drain, grace)

    def drain(self, grace: float) -> None:
        """Admit nothing more; the requests in line end now, the answers under way in `grace`
        seconds at the latest."""
        if not self.draining:
            self.draining = True
            self._inbox.put(("drain", time.monotonic() + grace))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join()

    # -- the loop's side -------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, max_tokens: int) -> Job:
        if self.draining:
            raise ShuttingDown
        if self.open >= self.capacity or not self.alive:
            raise Busy
        job = Job(prompt, sampling, max_tokens)
        self.open += 1
        self._inbox.put(("add", job))
        return job

    def close(self, job: Job) -> None:
        """The request is over; an answer still running gives its row up before the next round."""
        if job.closed:
            return
        job.closed = True
        self.open -= 1
        if not job.finished:
            self._inbox.put(("cancel", job))

    # -- the decoding thread -----------------------------------------------------------------
    def _run(self) -> None:
        waiting: deque[Job] = deque()
        running: dict[Stream, Job] = {}
        deadline = None  # when the answers under way end, once draining
        while True:
            if not waiting and not running:  # answers ended: what the pair learned is written
                self.decoder.close()
            for op, job in self._commands(block=not waiting and not running):
                if op == "stop":
                    for left in [*waiting, *running.values()]:
                        left.deliver(Event([], error=SHUTTING_DOWN, shutting_down=True))
                    self.decoder.close()
                    return
                if op == "drain":
                    deadline = job
                    for left in waiting:
                        left.deliver(Event([], error=SHUTTING_DOWN, shutting_down=True))
                    waiting.clear()
                elif op == "add":
                    waiting.append(job)
                else:
                    self._cancel(job, waiting, running)
            if deadline is not None and running and time.monotonic() >= deadline:
                for stream, left in running.items():
                    self.decoder.remove(stream)
                    left.deliver(Event([], error=SHUTTING_DOWN, shutting_down=True))
                running.clear()
            self.running, self.waiting = len(running), len(waiting)
            try:
                while waiting and len(running) < self.batch:
                    job = waiting.popleft()
                    self.waiting = len(waiting)
                    self._admit(job, running)
                if running:
                    self._round(running)
            except Exception as e:  # not one answer's fault: the answers under way cannot go on
                self._log("decoding failed; the answers under way are dropped", e)
                for job in running.values():
                    job.deliver(Event([], error="the engine failed while decoding this answer"))
                running.clear()
                self.running = 0
                self.decoder = Decoder(self.pair, mtp=self.mtp, draft_tokens=self.draft_tokens)

    def _round(self, running: dict[Stream, Job]) -> None:
        for job in running.values():
            job.rows_together = max(job.rows_together, len(running))
        marks = isolation.mark(self.decoder)
        try:
            out = self.decoder.step()
        except Exception as e:
            self._log(f"a round of {len(running)} answers failed; each steps alone", e)
            out, failed = isolation.step_each_alone(self.decoder, marks)
            for stream in failed:
                job = running.pop(stream)
                job.deliver(Event([], error="the engine failed while decoding this answer"))
            log.error("%d answer(s) ended by a failure of their own; the others go on", len(failed))
        for emitted in out:
            self._hand(emitted, running[emitted.stream], running)

    def _log(self, what: str, e: Exception) -> None:
        """One line; the traceback too with --debug."""
        log.error("%s: %s: %s", what, type(e).__name__, e, exc_info=e if self.debug else None)

    def _commands(self, *, block: bool) -> list[tuple[str, Job | None]]:
        out = []
        try:
            out.append(self._inbox.get(block=block))
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def _cancel(self, job: Job, waiting: deque[Job], running: dict[Stream, Job]) -> None:
        if job in waiting:
            waiting.remove(job)
            return
        stream = next((s for s, j in running.items() if j is job), None)
        if stream is not None:  # None: it finished before its reader left
            self.decoder.remove(stream)
            del running[stream]

    def _admit(self, job: Job, running: dict[Stream, Job]) -> None:
        s = job.sampling
        try:
            sampler, stop = make_sampler(
                self.pair,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=s.seed,
                ignore_eos=s.ignore_eos,
            )
            emitted = self.decoder.add(job.prompt, sampler, max_tokens=job.max_tokens, stop=stop)
        except GemmaChatError as e:  # this prompt cannot run; the others go on
            job.deliver(Event([], error=str(e)))
            return
        except Exception as e:  # the engine failed on this prompt alone; the others go on
            self._log("admitting a request failed", e)
            job.deliver(Event([], error="the engine failed on this prompt"))
            return
        self._hand(emitted, job, running)

    def _hand(self, emitted: Emitted, job: Job, running: dict[Stream, Job]) -> None:
        if emitted.finish_reason:
            running.pop(emitted.stream, None)
        else:
            running[emitted.stream] = job
        self.running = len(running)
        stats = emitted.stream.stats.as_dict()
        job.deliver(Event(emitted.tokens, emitted.finish_reason, stats, job.rows_together))
