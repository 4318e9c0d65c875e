"""The KV cache of a saved conversation, in a safetensors file beside its transcript
(`FILE.kv.safetensors`): every layer's cache, the token ids it holds and the conversation's
token form (`carried`, chat/session.py), so that a resumed chat prefills only its new turn.

The file only saves time, so any doubt refuses it (`CacheRefused`, a one-line reason) and the
transcript alone is loaded, to be prefilled. It is refused when
- its format or version is another;
- it does not hash to the digest it records (SHA-256 over the metadata and every tensor):
  truncated, damaged or edited;
- it was saved for another target: a fingerprint of the weights (a strided sample of every
  tensor, so two checkpoints of the same shape differ) and of the chat template. Another
  quantisation of the same model differs too: its numbers are not the same. The drafter is
  recorded, not checked: it owns no cache (DESIGN §2) and the answer is the target's whatever
  drafts it;
- it was saved with another transcript (the transcript's digest; an edited or later transcript
  does not match);
- its layers do not fit this model's caches (count, kind, window, slack, shapes, offsets).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..engine.context import Context
from ..models.cache import SlidingWindowCache
from ..models.fingerprint import fingerprint
from .private_files import write_private

FORMAT = "gemma-chat.kv-cache"
VERSION = 1


class CacheRefused(Exception):
    """The saved cache cannot be used; the message says why in a few words."""


@dataclass
class SavedCache:
    cache: list  # one cache per layer, as `Model.make_cache` builds them
    tokens: list[int]  # the token ids they hold
    carried: list[int] | None  # the conversation's token form, when it had one


def cache_path(transcript: Path) -> Path:
    return transcript.with_name(transcript.name + ".kv.safetensors")


def target_identity(pair) -> str:
    return fingerprint(pair.target, getattr(pair.tokenizer, "chat_template", None))


def write_cache(
    path: Path,
    context: Context,
    carried: list[int] | None,
    pair,
    *,
    model_name: str,
    transcript_digest: str,
) -> Path:
    """Save `context` (not empty) atomically, mode 0600; `model_name` is what the user called
    the target, for the message that refuses the file elsewhere."""
    arrays = {"tokens": mx.array(context.tokens, dtype=mx.int32)}
    if carried is not None:
        arrays["carried"] = mx.array(carried, dtype=mx.int32)
    layers = []
    for i, c in enumerate(context.cache):
        if isinstance(c, SlidingWindowCache):
            keys, values, offset, written = c.state
            layers.append({"kind": "sliding", "offset": offset, "written": written})
        else:  # FullCache: the allocation grows in steps; only the held positions are saved
            keys, values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            layers.append({"kind": "full", "offset": c.offset})
        arrays[f"keys.{i}"], arrays[f"values.{i}"] = mx.contiguous(keys), mx.contiguous(values)
    drafter = pair.drafter
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "target": model_name,
        "target_fingerprint": target_identity(pair),
        "drafter": str(pair.drafter_path) if drafter is not None else "",
        "drafter_fingerprint": fingerprint(drafter) if drafter is not None else "",
        "transcript": transcript_digest,
        "slack": str(context.slack),
        "layers": json.dumps(layers),
    }
    meta["digest"] = _digest(arrays, meta)
    return write_private(path, lambda f: mx.save_safetensors(f, arrays, metadata=meta))


def read_cache(
    path: Path, pair, slack: int, transcript_digest: str, limit: int | None = None
) -> SavedCache:
    """The cache saved at `path` for this pair and transcript, or CacheRefused; `limit` is the
    context it goes into (it caps the full-attention buffers, `Model.make_cache`)."""
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception:  # MLX reports truncation and garbage as RuntimeError or ValueError
        raise CacheRefused("it cannot be read (truncated, or not a safetensors file)") from None
    if meta.get("format") != FORMAT:
        raise CacheRefused(f"it is not a gemma-chat KV cache (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CacheRefused(
            f"format version {meta.get('version')!r}; this gemma-chat reads {VERSION}"
        )
    recorded = meta.pop("digest", None)
    try:
        intact = recorded == _digest(arrays, meta)
    except Exception:  # a tensor MLX cannot hand over as bytes: damaged beyond reading
        intact = False
    if not intact:
        raise CacheRefused("it does not match its checksum (damaged or edited)")
    if meta.get("target_fingerprint") != target_identity(pair):
        raise CacheRefused(f"it was saved for another model ({meta.get('target')})")
    if meta.get("transcript") != transcript_digest:
        raise CacheRefused("it was saved with another version of this conversation")
    try:
        return _rebuild(arrays, meta, pair.target, slack, limit)
    except (KeyError, ValueError, TypeError) as e:
        raise CacheRefused(f"it does not fit this model's caches ({e})") from None


def _rebuild(arrays: dict, meta: dict, target, slack: int, limit: int | None) -> SavedCache:
    if meta.get("slack") != str(slack):
        raise ValueError(f"slack {meta.get('slack')}, not {slack}")
    tokens = _ids(arrays["tokens"], target)
    carried = _ids(arrays["carried"], target) if "carried" in arrays else None
    layers = json.loads(meta["layers"])
    cache = target.make_cache(slack, limit)
    if len(layers) != len(cache):
        raise ValueError(f"{len(layers)} layers, not {len(cache)}")
    for i, (layer, c) in enumerate(zip(layers, cache)):
        keys, values, offset = arrays[f"keys.{i}"], arrays[f"values.{i}"], int(layer["offset"])
        attention = target.model.layers[i].self_attn
        expected = (1, attention.n_kv_heads, keys.shape[2], attention.head_dim)
        if keys.shape != expected or values.shape != expected or offset != len(tokens):
            raise ValueError(f"layer {i} has shape {keys.shape} at {offset}")
        if isinstance(c, SlidingWindowCache):
            written = int(layer["written"])
            held = keys.shape[2]
            if layer["kind"] != "sliding" or not (min(offset, c.capacity) <= held <= c.capacity):
                raise ValueError(f"layer {i} is not a ring of {c.capacity} slots")
            if written < offset:
                raise ValueError(f"layer {i} was written to {written}, before {offset}")
            c.state = (keys, values, offset, written)
        else:
            if layer["kind"] != "full" or keys.shape[2] != offset:
                raise ValueError(f"layer {i} is not a full-attention cache")
            c.state = (keys, values, offset)
    return SavedCache(cache, tokens, carried)


def _ids(a: mx.array, target) -> list[int]:
    if a.ndim != 1:
        raise ValueError("token ids are not a list")
    ids = a.tolist()
    if any(not 0 <= t < target.args.vocab_size for t in ids):
        raise ValueError("token ids out of the vocabulary")
    return ids


def _digest(arrays: dict[str, mx.array], meta: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        a = mx.contiguous(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(memoryview(a))
    return h.hexdigest()
