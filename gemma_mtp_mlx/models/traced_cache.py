"""The caches as a compiled step sees them: whole buffers and positions held in arrays.

A compiled graph (mx.compile) is traced once per input shape and replayed after, so nothing in
it may depend on a Python number that changes from step to step. Here the cache offset is an
array, the sliding rings are their whole `capacity` slots and the full-attention buffers their
whole bucket (models/cache.py): new K/V are written at the offset (a dynamic slice update, a
scatter into the ring's slots) and attention reads the whole buffer through masks built from the
positions. The views they return are the eager caches' `KVView`s, so the model's layers run
unchanged.

`RowPositions` holds one row's position arithmetic for one forward, computed once and shared by
every layer of that row (per layer it would be a dozen small ops each, in every step).
"""

from functools import cached_property

import mlx.core as mx

from .cache import KVView, slot_positions, window_mask


class RowPositions:
    """The positions of one row in a forward of `length` new tokens after `offset` (an int32
    array of shape [1]), and the masks its rings (`ring_slots` each) and full buffers
    (`full_slots` each) read through, each built once (on first use) for all of its layers."""

    def __init__(self, offset: mx.array, length: int, window: int, ring_slots: int, full_slots: int):
        self.offset = offset
        self.window, self.ring_slots, self.full_slots = window, ring_slots, full_slots
        self.queries = offset + mx.arange(length)  # absolute positions of the new tokens

    @cached_property
    def slots(self) -> mx.array:
        """The ring slot of each new token, as [1, 1, length, 1] indices along a ring's slots."""
        return (self.queries % self.ring_slots).reshape(1, 1, -1, 1)

    @cached_property
    def ring_mask(self) -> mx.array:
        """[length, ring_slots]: each new token sees the window behind it, itself included."""
        end = self.queries[-1:] + 1
        return window_mask(self.queries, slot_positions(end, self.ring_slots, self.ring_slots),
                           self.window)

    @cached_property
    def full_mask(self) -> mx.array:
        """[length, full_slots]: causal over a buffer whose slot p holds position p."""
        return mx.arange(self.full_slots)[None, :] <= self.queries[:, None]

    def drafter_ring_mask(self, visible: int) -> mx.array:
        """[1, ring_slots]: the last `visible` committed positions (before the new tokens)."""
        held = slot_positions(self.offset, self.ring_slots, self.ring_slots)
        return window_mask(self.offset - 1, held, visible)

    @cached_property
    def drafter_full_mask(self) -> mx.array:
        """[1, full_slots]: every committed position."""
        return mx.arange(self.full_slots)[None, :] < self.offset[:, None]


class TracedRing:
    """A sliding-window ring (`SlidingWindowCache`) inside a compiled step."""

    def __init__(self, keys: mx.array, values: mx.array, positions: RowPositions):
        self.keys, self.values, self.positions = keys, values, positions

    def store(self, keys: mx.array, values: mx.array, rope) -> KVView:
        p = self.positions
        # One scatter along the slots' axis: indexing assignment would build index arrays for
        # every other axis too, a dozen primitives per write instead of one.
        self.keys = mx.put_along_axis(self.keys, p.slots, rope(keys, offset=p.offset), axis=2)
        self.values = mx.put_along_axis(self.values, p.slots, values, axis=2)
        return KVView(self.keys, self.values, p.ring_mask, p.offset)

    def drafter_view(self, visible: int) -> KVView:
        p = self.positions
        return KVView(self.keys, self.values, p.drafter_ring_mask(visible), p.offset)


class TracedFull:
    """A full-attention buffer (`FullCache`) inside a compiled step."""

    def __init__(self, keys: mx.array, values: mx.array, positions: RowPositions):
        self.keys, self.values, self.positions = keys, values, positions

    def store(self, keys: mx.array, values: mx.array, rope) -> KVView:
        p = self.positions
        self.keys = mx.slice_update(self.keys, rope(keys, offset=p.offset), p.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, p.offset, axes=(2,))
        return KVView(self.keys, self.values, p.full_mask, p.offset)

    def drafter_view(self) -> KVView:
        p = self.positions
        return KVView(self.keys, self.values, p.drafter_full_mask, p.offset)
