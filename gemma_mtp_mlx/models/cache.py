"""KV caches for the Gemma 4 target that can roll back a rejected draft exactly, and the views
that attention reads through.

One protocol for every layer: `cache.store(keys, values, rope)` applies RoPE to the new keys at
the cache's position, stores them and returns a `KVView` (keys, values, mask, and the position
of the first query) that `view.attend(queries, rope)` turns into attention. KV-shared layers and
the drafter attend through the view their source layer returned; the model never sees offsets.

Full-attention layers use `FullCache`, mlx-lm's `KVCache` (trimming it is exact at any length)
growing in buckets (`full_slots`): a compiled step (engine/steps.py) sees one buffer shape for
many steps, and so traces its graph again only a few times per doubling of the context.

Sliding-window layers use `SlidingWindowCache`, a ring buffer of `window + slack` slots where
the key of absolute position p always lives in slot `p % capacity`. Keeping `slack` extra slots
means that after a verify block is partly rejected, the entries that the rejected tokens
overwrote are older than any future query's window: rolling back is just moving the offset back
(mlx-lm's `RotatingKVCache` cannot be trimmed once it has wrapped — spec §4.2). How many tokens
that allows is `max_rollback`. The ring is allocated whole at its first write, so its shape never
changes. Because the ring holds more than `window` positions, attention
always goes through a mask built from the absolute positions of the slots; the slot -> position
map is arithmetic on Python ints, so building it costs no host sync.

`RowsCache` and `RowsView` carry a batch of independent sequences (rows) through one forward:
projections run batched, so the weights are read once, while RoPE, storing and attention go
row by row, each row at its own position.
"""

from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache


def full_slots(n: int) -> int:
    """Slots a full-attention buffer allocates to hold `n` positions: multiples of 256, then of a
    quarter of the largest power of two up to `n`. A new size is a new shape for a compiled step
    (a trace), four times per doubling of the context; at most a fifth of the buffer is unused."""
    unit = max(256, 2 ** (max(n, 1).bit_length() - 3))
    return -(-n // unit) * unit


def slot_positions(end: int, n_slots: int, capacity: int) -> mx.array:
    """Absolute position held by each of the first `n_slots` ring slots once `end` tokens are in.

    Slots that hold nothing yet get a negative position.
    """
    slots = mx.arange(n_slots)
    return (end - 1) - ((end - 1 - slots) % capacity)


def window_mask(query_positions: mx.array, key_positions: mx.array, window: int) -> mx.array:
    """Boolean [Lq, Lk] mask: key j is visible to query i iff i - window < j <= i (and j >= 0)."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    return (k <= q) & (k > q - window) & (k >= 0)


def block_overlay(start: int, blocks: mx.array, key_positions: mx.array) -> mx.array:
    """Boolean [L, Lk]: the later keys a query at start + i sees besides the causal window,
    those of its own image (spec §7, `use_bidirectional_attention: "vision"`). `blocks` [L]
    gives each new position its image's number, -1 for text; keys before `start` are earlier,
    hence already visible within the window."""
    L = blocks.shape[0]
    queries = mx.arange(start, start + L)[:, None]
    inside = (key_positions >= start) & (key_positions < start + L)
    key_blocks = mx.where(inside, blocks[mx.clip(key_positions - start, 0, L - 1)], -1)
    same = (blocks[:, None] == key_blocks[None, :]) & (blocks[:, None] >= 0)
    return same & (key_positions[None, :] > queries)


@lru_cache(maxsize=32)
def ring_mask(start: int, length: int, n_slots: int, capacity: int, window: int) -> mx.array:
    """The mask of queries at start .. start + length - 1 over the first `n_slots` slots of a
    ring of `capacity` once those queries are in. Every sliding layer of a forward has the same
    one, so it is built once per step (a handful of small ops per layer otherwise)."""
    end = start + length
    return window_mask(mx.arange(start, end), slot_positions(end, n_slots, capacity), window)


class KVView(NamedTuple):
    """What one sequence's queries attend to: keys (RoPE applied), values, the mask (None, a
    boolean array or "causal") and the absolute position of the first query."""

    keys: mx.array
    values: mx.array
    mask: mx.array | str | None
    offset: int

    def attend(self, queries: mx.array, rope) -> mx.array:
        """Attention with scale 1.0 (Gemma 4 normalises q and k instead, pitfall 2)."""
        q = rope(queries, offset=self.offset)
        return mx.fast.scaled_dot_product_attention(
            q, self.keys, self.values, scale=1.0, mask=self.mask
        )


class RowsView(NamedTuple):
    """One `KVView` per row of a batch of independent sequences."""

    rows: list[KVView]

    def attend(self, queries: mx.array, rope) -> mx.array:
        return mx.concatenate([v.attend(queries[b : b + 1], rope) for b, v in enumerate(self.rows)])


def uncached_view(keys: mx.array, values: mx.array, rope, window: int | None) -> KVView:
    """A forward without a cache (training, references): positions from 0, causal, windowed on
    sliding layers."""
    L = keys.shape[2]
    pos = mx.arange(L)
    mask = window_mask(pos, pos, window or L + 1) if L > 1 else None
    return KVView(rope(keys, offset=0), values, mask, 0)


class FullCache(KVCache):
    """Every position (mlx-lm's KVCache), its buffer grown in buckets (`full_slots`), never
    beyond `limit` slots (the context the memory preflight counted) unless asked to."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit

    def reserve(self, n: int, like_k: mx.array, like_v: mx.array) -> None:
        """Grow the buffer so that it holds at least `n` positions."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if n <= have:
            return
        B, H, _, Dk = like_k.shape
        grow = max(n, min(full_slots(n), self.limit or full_slots(n))) - have
        new_k = mx.zeros((B, H, grow, Dk), like_k.dtype)
        new_v = mx.zeros((B, H, grow, like_v.shape[3]), like_v.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def store(self, keys: mx.array, values: mx.array, rope) -> KVView:
        offset, L = self.offset, keys.shape[2]
        self.reserve(offset + L, keys, values)
        keys, values = self.update_and_fetch(rope(keys, offset=offset), values)
        return KVView(keys, values, "causal" if L > 1 else None, offset)

    def adopt(self, keys: mx.array, values: mx.array, length: int) -> None:
        """Take back the buffers a compiled step wrote `length` new positions into."""
        self.keys, self.values = keys, values
        self.offset += length

    def drafter_view(self) -> KVView:
        """Every committed position, for the drafter's query at the newest one (spec §3.4)."""
        keys, values = self.keys_and_values()
        return KVView(keys, values, None, self.offset)

    def max_rollback(self) -> int:
        return self.offset


class SlidingWindowCache:
    def __init__(self, window: int, slack: int = 64):
        self.window = window
        self.slack = slack
        self.capacity = window + slack
        self.keys = None
        self.values = None
        self.offset = 0
        self.written = 0  # the end of the furthest write: rolled-back slots stay overwritten

    # -- writing ---------------------------------------------------------------------------
    def reserve(self, n: int, like_k: mx.array, like_v: mx.array) -> None:
        """Allocate every slot (a prefill may have left fewer): `n` is there for the caches'
        common protocol; a ring holds `capacity` slots whatever the length."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if have == self.capacity:
            return
        B, H, _, Dk = like_k.shape
        new_k = mx.zeros((B, H, self.capacity - have, Dk), like_k.dtype)
        new_v = mx.zeros((B, H, self.capacity - have, like_v.shape[3]), like_v.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def _write(self, keys: mx.array, values: mx.array):
        """Write L <= capacity new positions [offset, offset + L) into their slots."""
        L = keys.shape[2]
        start = self.offset % self.capacity
        first = min(L, self.capacity - start)
        self.keys[..., start : start + first, :] = keys[..., :first, :]
        self.values[..., start : start + first, :] = values[..., :first, :]
        if first < L:
            self.keys[..., : L - first, :] = keys[..., first:, :]
            self.values[..., : L - first, :] = values[..., first:, :]

    def _temporal(self) -> tuple[mx.array, mx.array, int]:
        """The stored positions in temporal order, and the position of the first one."""
        n = min(self.offset, self.capacity)
        if self.offset <= self.capacity:
            return self.keys[..., :n, :], self.values[..., :n, :], 0
        s = self.offset % self.capacity
        k = mx.concatenate([self.keys[..., s:, :], self.keys[..., :s, :]], axis=2)
        v = mx.concatenate([self.values[..., s:, :], self.values[..., :s, :]], axis=2)
        return k, v, self.offset - self.capacity

    def store(self, keys: mx.array, values: mx.array, rope, blocks: mx.array | None = None) -> KVView:
        """Store L new positions; the view for the L queries at those positions. `blocks`: the
        image each new position belongs to, for a prefill whose images attend both ways."""
        start = self.offset
        keys = rope(keys, offset=start)
        L = keys.shape[2]
        end = start + L
        if L <= self.slack + 1:
            # Everything the new queries can see is in the ring after writing.
            self.reserve(end, keys, values)
            self._write(keys, values)
            self.offset, self.written = end, max(end, self.written)
            k, v = self.visible()
            if L == 1 and end <= self.window:
                return KVView(k, v, None, start)
            mask = ring_mask(start, L, k.shape[2], self.capacity, self.window)
            if blocks is not None:
                slots = slot_positions(end, k.shape[2], self.capacity)
                mask = mask | block_overlay(start, blocks, slots)
            return KVView(k, v, mask, start)

        # A long block (prefill): attend over old + new in temporal order, then keep the tail.
        if self.keys is None:
            old_k, old_v, first = keys[..., :0, :], values[..., :0, :], 0
        else:
            old_k, old_v, first = self._temporal()
        all_k = mx.concatenate([old_k, keys], axis=2)
        all_v = mx.concatenate([old_v, values], axis=2)
        mask = window_mask(mx.arange(start, end), mx.arange(first, end), self.window)
        if blocks is not None:
            mask = mask | block_overlay(start, blocks, mx.arange(first, end))
        if all_k.shape[2] <= self.capacity:
            self.keys, self.values = all_k, all_v
        else:
            tail_k, tail_v = all_k[..., -self.capacity :, :], all_v[..., -self.capacity :, :]
            split = self.capacity - end % self.capacity
            self.keys = mx.concatenate([tail_k[..., split:, :], tail_k[..., :split, :]], axis=2)
            self.values = mx.concatenate([tail_v[..., split:, :], tail_v[..., :split, :]], axis=2)
        self.offset = self.written = end
        return KVView(all_k, all_v, mask, start)

    def adopt(self, keys: mx.array, values: mx.array, length: int) -> None:
        """Take back the buffers a compiled step wrote `length` new positions into."""
        self.keys, self.values = keys, values
        self.offset += length
        self.written = max(self.written, self.offset)

    # -- reading ---------------------------------------------------------------------------
    def visible(self) -> tuple[mx.array, mx.array]:
        """The slots that can hold live positions (before the ring is full: [0, offset))."""
        n = min(self.offset, self.capacity)
        return self.keys[..., :n, :], self.values[..., :n, :]

    def key_positions(self) -> mx.array:
        n = min(self.offset, self.capacity)
        return slot_positions(self.offset, n, self.capacity)

    def drafter_view(self, visible: int) -> KVView:
        """The last `visible` committed positions (the drafter sees window + 1 of them, spec
        §3.4), for its query at the newest one."""
        keys, values = self.visible()
        mask = None
        if self.offset > visible:
            mask = window_mask(mx.array([self.offset - 1]), self.key_positions(), visible)
        return KVView(keys, values, mask, self.offset)

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int, int]:
        """All a ring is: (keys, values, offset, written), as mlx-lm's caches expose theirs.
        Snapshots (engine/snapshot.py) and saved caches (chat/saved_cache.py) read and set it."""
        return self.keys, self.values, self.offset, self.written

    @state.setter
    def state(self, value: tuple[mx.array | None, mx.array | None, int, int]) -> None:
        self.keys, self.values, self.offset, self.written = value

    # -- rollback --------------------------------------------------------------------------
    def max_rollback(self) -> int:
        """How far the offset can move back with every position a later read needs intact.
        Before the ring wraps, every position is stored. After, writing position p overwrote
        p - capacity, so positions below `written - capacity` are gone; the furthest back
        anything reads from offset o is the drafter, o - 1 - window (it sees window + 1 keys,
        spec §3.4). Hence written - o <= slack - 1."""
        if self.written <= self.capacity:
            return self.offset
        return self.slack - 1 - (self.written - self.offset)

    def trim(self, n: int) -> int:
        if n > self.max_rollback():
            raise ValueError(f"cannot roll back {n} tokens with a slack of {self.slack}")
        self.offset -= n
        return n


class RowsCache:
    """One layer's caches for a batch of independent sequences (rows) run in one forward: each
    row keeps its own cache at its own length, so rows that accepted different numbers of
    drafts never need padding."""

    def __init__(self, rows: list):
        self.rows = rows

    def store(self, keys: mx.array, values: mx.array, rope) -> RowsView:
        return RowsView(
            [c.store(keys[b : b + 1], values[b : b + 1], rope) for b, c in enumerate(self.rows)]
        )
