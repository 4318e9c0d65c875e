"""`generate`: prompt -> streamed chunks of text and token ids, plain or speculative (a decoder
of one answer, engine/decode.py, with the text added)."""

from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx

from ..errors import GemmaChatError
from ..images.messages import has_images, split_images
from ..images.prompt import ImagePrompt, expand_images
from ..images.vision import vision_of
from .context import Context
from .decode import Decoder, Emitted
from .sampling import Sampler, SamplerSettings, ban_bias
from .stats import GenerationStats, RoundStats


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str | None = None  # "stop" (end of sequence) or "length" on the last chunk
    round: RoundStats | None = None  # the round that produced this chunk (None: the prefill)


def encode_prompt(
    tokenizer, prompt, *, raw: bool = False, vision=None, thinking: bool = False, fetch=None
) -> list[int]:
    """A string (chat-templated unless `raw`), a list of chat messages, or token ids. Thinking
    is passed explicitly: mlx-lm's wrapper would switch it on for Gemma 4 otherwise. Messages
    with image parts need `vision` (the pair's) and give an `ImagePrompt`; `fetch` reads
    http(s) image URLs where they are allowed."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt if isinstance(prompt, ImagePrompt) else list(prompt)
    if isinstance(prompt, str) and raw:
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer.chat_template is None:
        raise GemmaChatError("this tokenizer has no chat template; use --raw")
    messages, images = split_images(messages, fetch)
    if images and vision is None:
        raise GemmaChatError("this model has no vision tower: it cannot read images")
    prepared = [vision.prepare(image) for image in images]
    ids = list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, enable_thinking=thinking
    ))
    return expand_images(ids, prepared, vision.marks, vision.encode) if images else ids


def make_sampler(
    pair, *, temperature=0.0, top_p=1.0, top_k=0, seed=None, ignore_eos=False
) -> tuple[Sampler, frozenset[int]]:
    """A sampler for one answer and the ids that end it (none under `ignore_eos`, which bans
    them instead)."""
    eos = frozenset(pair.tokenizer.eos_token_ids)
    bias = ban_bias(pair.target.args.vocab_size, sorted(eos)) if ignore_eos else None
    sampler = Sampler(SamplerSettings(temperature, top_k, top_p), bias, seed)
    return sampler, frozenset() if ignore_eos else eos


def generate(
    pair,
    prompt,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    mtp: bool = True,
    draft_tokens: int | None = None,
    ignore_eos: bool = False,
    raw: bool = False,
    context: Context | None = None,
    compile: bool | None = None,
) -> Iterator[Chunk]:
    """Stream the answer to `prompt`. With `mtp` and a drafter, speculative rounds of
    `draft_tokens` drafts (None: the measured policy chooses per round, parking at 0 when
    drafting loses); the tokens are the target's own either way (greedy: identical to plain
    decoding; sampling: distributed as the target's). `context` carries a KV cache over from
    earlier prompts (a chat); only the tokens after the common prefix are prefilled. `compile`
    picks compiled or eager steps (None: as `pair.compile` says); the tokens are the same."""
    vision = vision_of(pair) if has_images(prompt) else None
    tokens = encode_prompt(pair.tokenizer, prompt, raw=raw, vision=vision)
    sampler, stop = make_sampler(
        pair, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos
    )
    decoder = Decoder(pair, mtp=mtp, draft_tokens=draft_tokens, compile=compile)
    mx.reset_peak_memory()
    detok = pair.tokenizer.detokenizer
    detok.reset()
    try:
        emitted = decoder.add(tokens, sampler, max_tokens=max_tokens, stop=stop, context=context)
        yield _chunk(emitted, detok)
        while emitted.finish_reason is None:
            for emitted in decoder.step():
                yield _chunk(emitted, detok)
    finally:  # also when the reader stops early: the cache holds exactly what was emitted
        decoder.close()


def _chunk(emitted: Emitted, detok) -> Chunk:
    stats = emitted.stream.stats
    stats.peak_memory_bytes = mx.get_peak_memory()
    for t in emitted.tokens:
        detok.add_token(t)
    if emitted.finish_reason:
        detok.finalize()
    return Chunk(detok.last_segment, emitted.tokens, stats, emitted.finish_reason, emitted.round)
