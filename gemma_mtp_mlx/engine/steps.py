"""The device work of decoding, eager or compiled: a speculative round's (draft, verify, accept:
engine/speculative.py) and a plain step's (one target forward and a pick).

`EagerSteps` builds the graph in Python at every step, as mlx-lm does. `CompiledSteps` runs the
same functions through `mx.compile`: each is traced once per shape (draft length, rows, the
sizes of the rows' full-attention buffers, the samplers' settings) and replayed after, so a
step costs the host one call where it built thousands of primitives one by one (DESIGN §2.6).
The caches go in and out of a compiled step as arrays (models/traced_cache.py): each row's
buffers and its offset; after the call the cache objects take the written buffers back and
advance as the eager store does, so rollback, snapshots and saved caches see no difference.
A sampling row draws from a key split off its own stream once per step, inside the step.
"""

import time
import weakref
from collections import OrderedDict
from functools import lru_cache
from statistics import linear_regression, mean

import mlx.core as mx

from ..models.cache import SlidingWindowCache
from ..models.traced_cache import RowPositions, TracedFull, TracedRing
from .speculative import RoundOutputs, Row, batched, draft, verify

MAX_FUNCTIONS = 32  # compiled steps kept (each holds its traced graphs); the oldest go first
# Traces are timed on this clock (the decoder's tests put their controlled one in its place).
clock = time.perf_counter


def _stacked(rows: list[Row]) -> tuple[mx.array, mx.array]:
    """The rows' newest tokens [B, 1] and the hidden states that produced them [B, 1, H]."""
    if len(rows) == 1:
        return rows[0].token.reshape(1, 1), rows[0].hidden
    return (
        mx.concatenate([r.token.reshape(1, 1) for r in rows]),
        mx.concatenate([r.hidden for r in rows]),
    )


def plain_step(target, tokens: mx.array, caches: list[list], samplers) -> tuple[list, mx.array]:
    """One target forward of each row's newest token (`tokens` [B, 1]): each row's next token
    [1, 1] and the hidden states [B, 1, H] that produced them."""
    logits, hidden = target(tokens, batched(caches), return_hidden=True, last_only=True)
    return [s.pick(logits[b, -1]).reshape(1, 1) for b, s in enumerate(samplers)], hidden


class EagerSteps:
    traces, trace_seconds = 0, 0.0  # nothing is traced: the graph is built anew at every step

    def __init__(self, target, drafter):
        self.target, self.drafter = target, drafter

    def trace_seconds_before(self, rows: list[Row], k: int) -> float:
        return 0.0

    def speculate(self, rows: list[Row], k: int) -> RoundOutputs:
        tokens, hidden = _stacked(rows)
        caches, samplers = [r.ctx.cache for r in rows], [r.sampler for r in rows]
        drafts = draft(self.target, self.drafter, k, tokens, hidden, caches, samplers)
        # Drafting starts now; the verify pass is built while it runs (no idle gap between).
        mx.async_eval([d if q is None else [d, q] for d, q in drafts])
        return verify(self.target, k, tokens, drafts, caches, samplers)

    def plain(self, rows: list[Row], tokens: mx.array) -> tuple[list, mx.array]:
        return plain_step(self.target, tokens, [r.ctx.cache for r in rows], [r.sampler for r in rows])


class CompiledSteps:
    def __init__(self, target, drafter):
        # Held weakly: these steps are kept per pair for as long as its models live (`steps_for`).
        self._target = weakref.ref(target)
        self._drafter = weakref.ref(drafter) if drafter is not None else lambda: None
        self.functions: OrderedDict = OrderedDict()
        self.traces = 0  # graphs traced so far: the first step of each shape, and no other
        self.trace_seconds = 0.0  # the host's time in the calls that traced (the warm-up)
        self.traced_drafts: dict[int, float] = {}  # per K (0: plain), its latest trace's seconds

    @property
    def target(self):
        return self._target()

    @property
    def drafter(self):
        return self._drafter()

    def speculate(self, rows: list[Row], k: int, start: tuple | None = None) -> RoundOutputs:
        """A round for `rows`. `start`, when given, is what the round starts from as arrays the
        device computes (engine/rounds.py): the newest tokens [B, 1], the hidden states [B, 1, H]
        and the offsets [B]; the caches' offsets are then left for the caller to set."""
        tokens, hidden = _stacked(rows) if start is None else start[:2]

        def work(target, tokens, hidden, caches, samplers):
            drafts = draft(target, self.drafter, k, tokens, hidden, caches, samplers)
            return verify(target, k, tokens, drafts, caches, samplers)

        offsets = None if start is None else start[2]
        return RoundOutputs(*self._run(("round", k), work, rows, k + 1, tokens, hidden, offsets))

    def plain(self, rows: list[Row], tokens: mx.array) -> tuple[list, mx.array]:
        def work(target, tokens, hidden, caches, samplers):
            return plain_step(target, tokens, caches, samplers)

        return self._run(("plain",), work, rows, 1, tokens, None)

    def trace_seconds_before(self, rows: list[Row], k: int) -> float:
        """What the host would spend tracing before a step of `k` drafts (0: a plain step) for
        `rows` as their buffers stand: nothing once that shape is traced; else what K's trace took
        at another buffer size, or the line through the traces of the other lengths (their least
        squares): a round's graph holds K drafter steps, so it grows with K (the demo pair: a
        plain step 6-7 ms, rounds of 1..6 drafts 10-29 ms). None yet: nothing known, nothing
        charged; one: its time."""
        kind = ("round", k) if k else ("plain",)
        if not self.traced_drafts or _signature(kind, rows) in self.functions:
            return 0.0
        if k in self.traced_drafts:
            return self.traced_drafts[k]
        slope, intercept = _trace_line(tuple(self.traced_drafts.items()))
        return max(0.0, intercept + slope * k)

    def _run(self, kind: tuple, work, rows: list[Row], length: int, tokens, hidden, offsets=None):
        """`work` over `rows`' caches as one compiled call that writes `length` new positions
        after `offsets` ([B] int32; None: the caches' own, which then advance by `length`; else
        the caches' offsets must bound them from above)."""
        for r in rows:
            for c in r.ctx.cache:
                c.reserve(c.offset + length, c.keys, c.values)
        samplers = [r.sampler for r in rows]
        function = self._function(_signature(kind, rows), work, samplers, length)
        advance = length if offsets is None else 0
        if offsets is None:
            offsets = mx.array([r.ctx.cache[0].offset for r in rows], dtype=mx.int32)
        keys = [None if s.greedy else s.key() for s in samplers]
        biases = [s.bias for s in samplers]
        # The cache objects let go of their buffers during the call, so that MLX writes the new
        # positions in place (it only updates a buffer nothing else holds).
        buffers = [[(c.keys, c.values) for c in r.ctx.cache] for r in rows]
        for r in rows:
            for c in r.ctx.cache:
                c.keys = c.values = None
        traces, start = self.traces, clock()
        try:
            out, written = function(tokens, hidden, offsets, buffers, keys, biases)
        except BaseException:
            _give_back(rows, buffers, 0)
            raise
        del buffers
        if self.traces != traces:
            seconds = clock() - start
            self.trace_seconds += seconds
            self.traced_drafts[length - 1] = seconds  # a round of K writes K + 1 positions
        _give_back(rows, written, advance)
        return out

    def _function(self, signature: tuple, work, samplers: list, length: int):
        if signature in self.functions:
            self.functions.move_to_end(signature)
            return self.functions[signature]
        window = self.target.args.sliding_window
        kinds = [isinstance(c, SlidingWindowCache) for c in self.target.make_cache()]

        def traced(tokens, hidden, offsets, buffers, keys, biases):
            # The model is looked up when tracing, not held: kept compiled steps must not keep
            # a model alive that its pair let go (`steps_for`).
            target = self.target
            self.traces += 1
            caches = []
            for b, row in enumerate(buffers):
                ring = next((k.shape[2] for (k, _), sliding in zip(row, kinds) if sliding), 1)
                full = next((k.shape[2] for (k, _), sliding in zip(row, kinds) if not sliding), 1)
                positions = RowPositions(offsets[b : b + 1], length, window, ring, full)
                caches.append([
                    (TracedRing if sliding else TracedFull)(k, v, positions)
                    for (k, v), sliding in zip(row, kinds)
                ])
            replicas = [s.replica(key, bias) for s, key, bias in zip(samplers, keys, biases)]
            out = work(target, tokens, hidden, caches, replicas)
            return out, [[(c.keys, c.values) for c in row] for row in caches]

        function = mx.compile(traced)
        self.functions[signature] = function
        if len(self.functions) > MAX_FUNCTIONS:
            self.functions.popitem(last=False)
        return function


@lru_cache(maxsize=4)
def _trace_line(traced: tuple) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the traces (draft length, seconds),
    level at their mean where it does not rise (one trace, or noise). Fitted once per set of
    traces: the policy asks for untraced lengths every round."""
    drafts, seconds = zip(*traced)
    if len(drafts) > 1:
        slope, intercept = linear_regression(drafts, seconds)
        if slope > 0:
            return slope, intercept
    return 0.0, mean(seconds)


def _signature(kind: tuple, rows: list[Row]) -> tuple:
    """What a compiled step is traced once for: its kind, the rows' sampling and buffer sizes."""
    return kind + (
        tuple((type(r.sampler), r.sampler.settings, r.sampler.bias is None) for r in rows),
        tuple(_full_slots(r.ctx.cache) for r in rows),
    )


def _full_slots(cache: list) -> int:
    return next((c.keys.shape[2] for c in cache if not isinstance(c, SlidingWindowCache)), 0)


def _give_back(rows: list[Row], buffers: list, length: int) -> None:
    """Hand each cache its buffers, `length` new positions written."""
    for r, row in zip(rows, buffers):
        for c, (k, v) in zip(r.ctx.cache, row):
            c.adopt(k, v, length)


_COMPILED: dict[tuple[int, int], CompiledSteps] = {}


def steps_for(target, drafter, compile: bool) -> EagerSteps | CompiledSteps:
    """The steps for this pair of model objects (drafter None: plain decoding only). Compiled
    ones are kept for as long as both models live, so every answer replays the graphs traced
    by the ones before."""
    if not compile:
        return EagerSteps(target, drafter)
    key = (id(target), id(drafter))
    if key not in _COMPILED:
        _COMPILED[key] = CompiledSteps(target, drafter)
        for model in (target, drafter):
            if model is not None:
                weakref.finalize(model, _COMPILED.pop, key, None)
    return _COMPILED[key]
