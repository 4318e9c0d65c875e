"""KV caches for the Gemma 4 target that can roll back a rejected draft exactly.

Full-attention layers use mlx-lm's growing `KVCache` (trimming it is exact at any length).

Sliding-window layers use `SlidingWindowCache`, a ring buffer of `window + slack` slots where
the key of absolute position p always lives in slot `p % capacity`. Keeping `slack` extra slots
means that after a verify block of up to `slack` tokens is partly rejected, the entries that the
rejected tokens overwrote are older than any future query's window: rolling back is just moving
the offset back (mlx-lm's `RotatingKVCache` cannot be trimmed once it has wrapped — spec §4.2).
Because the ring holds more than `window` positions, attention always goes through a mask built
from the absolute positions of the slots; the slot -> position map is arithmetic on Python ints,
so building it costs no host sync.
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache

__all__ = ["KVCache", "RowsCache", "SlidingWindowCache", "slot_positions", "window_mask"]

_ALLOC_STEP = 256


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


class SlidingWindowCache:
    def __init__(self, window: int, slack: int = 64):
        self.window = window
        self.slack = slack
        self.capacity = window + slack
        self.keys = None
        self.values = None
        self.offset = 0

    # -- writing ---------------------------------------------------------------------------
    def _ensure_allocated(self, n: int, like_k: mx.array, like_v: mx.array):
        """Grow the buffer (never beyond capacity) so that slots [0, n) exist."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if n <= have:
            return
        size = min(self.capacity, ((n + _ALLOC_STEP - 1) // _ALLOC_STEP) * _ALLOC_STEP)
        B, H, _, Dk = like_k.shape
        new_k = mx.zeros((B, H, size - have, Dk), like_k.dtype)
        new_v = mx.zeros((B, H, size - have, like_v.shape[3]), like_v.dtype)
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

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store L new positions; return (keys, values, mask) for the L queries at those positions."""
        L = keys.shape[2]
        end = self.offset + L
        query_pos = mx.arange(self.offset, end)
        if L <= self.slack + 1:
            # Everything the new queries can see is in the ring after writing.
            self._ensure_allocated(min(end, self.capacity), keys, values)
            self._write(keys, values)
            self.offset = end
            k, v = self.visible()
            if L == 1 and end <= self.window:
                return k, v, None
            key_pos = slot_positions(end, k.shape[2], self.capacity)
            return k, v, window_mask(query_pos, key_pos, self.window)

        # A long block (prefill): attend over old + new in temporal order, then keep the tail.
        if self.keys is None:
            old_k, old_v, first = keys[..., :0, :], values[..., :0, :], 0
        else:
            old_k, old_v, first = self._temporal()
        all_k = mx.concatenate([old_k, keys], axis=2)
        all_v = mx.concatenate([old_v, values], axis=2)
        mask = window_mask(query_pos, mx.arange(first, end), self.window)
        n = all_k.shape[2]
        if n <= self.capacity:
            self.keys, self.values = all_k, all_v
        else:
            tail_k, tail_v = all_k[..., -self.capacity :, :], all_v[..., -self.capacity :, :]
            split = self.capacity - end % self.capacity
            self.keys = mx.concatenate([tail_k[..., split:, :], tail_k[..., :split, :]], axis=2)
            self.values = mx.concatenate([tail_v[..., split:, :], tail_v[..., :split, :]], axis=2)
        self.offset = end
        return all_k, all_v, mask

    # -- reading ---------------------------------------------------------------------------
    def visible(self) -> tuple[mx.array, mx.array]:
        """The slots that can hold live positions (before the ring is full: [0, offset))."""
        n = min(self.offset, self.capacity)
        return self.keys[..., :n, :], self.values[..., :n, :]

    def key_positions(self) -> mx.array:
        n = min(self.offset, self.capacity)
        return slot_positions(self.offset, n, self.capacity)

    # -- rollback --------------------------------------------------------------------------
    def can_trim(self, n: int) -> bool:
        """Before the ring wraps every position is still stored; after, only `slack` can go."""
        return self.offset <= self.capacity or n <= self.slack

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise ValueError(f"cannot roll back {n} tokens with a slack of {self.slack}")
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v


class RowsCache:
    """One layer's caches for a batch of independent sequences (rows) run in one forward: each
    row keeps its own cache at its own length, so rows that accepted different numbers of
    drafts never need padding. Attention reads `rows[b]`; the model reads the offsets."""

    def __init__(self, rows: list):
        self.rows = rows

    @property
    def offset(self) -> list[int]:
        return [c.offset for c in self.rows]
