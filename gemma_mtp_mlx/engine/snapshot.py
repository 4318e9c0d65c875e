"""Snapshots of the sliding-window rings, for rollbacks deeper than their slack.

A sliding ring (models/cache.py) keeps `slack` slots beyond its window, so it can roll back a
rejected draft; once it has wrapped, anything deeper is overwritten. A chat needs deeper
rollbacks once per turn: the template drops the last answer's thoughts, so the next prompt
parts from the cache where that answer began. A snapshot of the rings taken there (the end of
the turn's prefill) makes that rollback exact: the rings go back to the snapshot and the
full-attention layers, which keep every position, are trimmed to the same length.

A snapshot costs no copy when taken. MLX arrays are values, but `x[i] = y` rebinds the handle
`x` to the updated array, so the snapshot holds handles of its own (`_handle`) rather than the
cache's. Holding the same buffer also keeps MLX from updating it in place (it only donates a
buffer with a single owner), so the ring's first write after a snapshot copies it: a snapshot
costs one copy of every sliding ring (window + slack slots), paid then and freed when the
snapshot is dropped.
"""

from dataclasses import dataclass

import mlx.core as mx

from ..models.cache import SlidingWindowCache


@dataclass(frozen=True)
class Snapshot:
    position: int  # tokens the cache held when it was taken
    rings: dict[int, tuple]  # layer index -> that sliding ring's state


def _handle(a: mx.array | None) -> mx.array | None:
    """A second handle on `a`'s current value (sharing its buffer)."""
    return None if a is None else a[...]


def _held(state: tuple) -> tuple:
    keys, values, offset, written = state
    return _handle(keys), _handle(values), offset, written


def take(cache: list, position: int) -> Snapshot:
    """What rolling `cache` back to `position` (its current length) later needs."""
    rings = {
        i: _held(c.state) for i, c in enumerate(cache) if isinstance(c, SlidingWindowCache)
    }
    return Snapshot(position, rings)


def restore(cache: list, snapshot: Snapshot) -> None:
    """Bring `cache` back to `snapshot.position`; every layer must still hold that prefix as it
    was (the caller tracks that). The snapshot stays usable: the rings get handles of their own."""
    for i, c in enumerate(cache):
        if i in snapshot.rings:
            c.state = _held(snapshot.rings[i])
        else:
            c.trim(c.offset - snapshot.position)
