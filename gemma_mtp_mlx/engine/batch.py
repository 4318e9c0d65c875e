"""Several prompts answered at once (`gemma-chat --prompt-file FILE --batch B`).

A decoder (engine/decode.py) with up to B answers running: every round, one target forward
verifies the drafts of all of them, so the target's weights are read once per round for the
whole batch (on a MoE, the experts that several rows pick are read once). Each row keeps its
own context and decodes exactly as its own run would; when one finishes, the next prompt takes
its place.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

from .decode import Decoder
from .generate import encode_prompt, make_sampler
from .stats import GenerationStats


@dataclass
class Answer:
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    stats: GenerationStats


def generate_batch(
    pair,
    prompts: list,
    *,
    batch: int | None = None,
    max_tokens: int | list[int] = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    mtp: bool = True,
    draft_tokens: int | None = None,
    ignore_eos: bool = False,
    raw: bool = False,
    compile: bool | None = None,
) -> Iterator[tuple[int, Answer]]:
    """(index, answer) for each of `prompts` (anything `encode_prompt` takes) as it finishes,
    `batch` running at a time (all at once by default). Each row's tokens are those of
    `generate` on its own (greedy); sampled rows draw from their own key stream (seed + index)
    and follow the target's distribution exactly. `max_tokens` may be one limit per prompt."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    base_seed = seed if seed is not None else time.time_ns() % 2**32
    decoder = Decoder(pair, mtp=mtp, draft_tokens=draft_tokens, compile=compile)
    running = {}  # stream -> (index, its tokens so far)
    waiting = list(range(len(prompts)))
    width = batch or len(prompts)

    def record(emitted) -> tuple[int, Answer] | None:
        i, ids = running[emitted.stream]
        ids += emitted.tokens
        if emitted.finish_reason:
            del running[emitted.stream]
            return i, Answer(ids, emitted.finish_reason, emitted.stream.stats)
        return None

    try:
        while waiting or running:
            finished = []
            while waiting and len(running) < width:
                i = waiting.pop(0)
                sampler, stop = make_sampler(
                    pair, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=base_seed + i, ignore_eos=ignore_eos,
                )
                tokens = encode_prompt(
                    pair.tokenizer, prompts[i], raw=raw, vision=getattr(pair, "vision", None)
                )
                emitted = decoder.add(tokens, sampler, max_tokens=limits[i], stop=stop)
                running[emitted.stream] = (i, [])
                finished.append(record(emitted))
            if running:
                finished += [record(emitted) for emitted in decoder.step()]
            yield from (f for f in finished if f is not None)
    finally:
        decoder.close()
