"""`generate`: prompt -> streamed chunks of text and token ids, plain or speculative."""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx

from ..errors import GemmaChatError
from .context import Context
from .plain import PlainSteps
from .policy import DraftPolicy, measure_costs
from .sampling import SamplerSettings, ban_bias, probabilities, sample
from .speculative import KeyStream, Row, run_round
from .stats import GenerationStats, RoundStats

# The most drafts per round the policy considers (explicit --draft-tokens may ask for more).
POLICY_MAX_DRAFT = 6
# Every PROBE_EVERY-th round drafts nothing: a plain decode step, timed as the measured baseline.
PROBE_EVERY = 16


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str | None = None  # "stop" (end of sequence) or "length" on the last chunk
    round: RoundStats | None = None  # the speculative round that produced this chunk


def encode_prompt(
    tokenizer, prompt, *, raw: bool = False, system: str | None = None, think: bool = False
) -> list[int]:
    """A string (chat-templated unless `raw`), a list of chat messages, or token ids.
    Thinking is passed explicitly: mlx-lm's wrapper would switch it on for Gemma 4 otherwise."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and raw:
        return tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if tokenizer.chat_template is None:
        raise GemmaChatError("this tokenizer has no chat template; use --raw")
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, enable_thinking=think
        )
    )


def answer_end(new: list[int], done: int, max_tokens: int, eos: set[int] | None) -> tuple[int, str | None]:
    """Where the `new` tokens end an answer that already has `done`: (index of the last token
    kept, "stop" at an end-of-sequence token or "length" at max_tokens), or (-, None)."""
    stop_at = next((i for i, t in enumerate(new) if t in eos), None) if eos else None
    if stop_at is not None:
        return stop_at, "stop"
    if done + len(new) >= max_tokens:
        return max_tokens - done - 1, "length"
    return len(new) - 1, None


def most_drafts(drafter, draft_tokens: int | None) -> int:
    """The most drafts a round may hold: none without a drafter, the fixed K, or the policy's
    ceiling."""
    if draft_tokens is not None and draft_tokens < 0:
        raise GemmaChatError("draft tokens must be 0 or more")
    if drafter is None:
        return 0
    return POLICY_MAX_DRAFT if draft_tokens is None else draft_tokens


def first_token(logits: mx.array, settings: SamplerSettings, bias, keys: KeyStream) -> mx.array:
    """The token after the prompt, [1, 1], from the prefill's last logits [1, 1, V]."""
    logits = logits[0, 0] if bias is None else logits[0, 0] + bias
    first = mx.argmax(logits) if settings.greedy else sample(probabilities(logits, settings), keys())
    return first.reshape(1, 1)


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
) -> Iterator[Chunk]:
    """Stream the answer to `prompt`. With `mtp` and a drafter, speculative rounds of
    `draft_tokens` drafts (None: the measured policy chooses per round, parking at 0 when
    drafting loses); the tokens are the target's own either way (greedy: identical to plain
    decoding; sampling: distributed as the target's). `context` carries a KV cache over from
    earlier prompts (a chat); only the tokens after the common prefix are prefilled."""
    tokens = encode_prompt(pair.tokenizer, prompt, raw=raw)
    drafter = pair.drafter if mtp else None
    k = most_drafts(drafter, draft_tokens)
    ctx = context or Context(pair.target, slack=max(64, k + 2))
    if k + 2 > ctx.slack:
        raise GemmaChatError(f"at most {ctx.slack - 2} draft tokens with this context")
    settings = SamplerSettings(temperature, top_k, top_p)
    eos = set(pair.tokenizer.eos_token_ids)
    bias = ban_bias(pair.target.args.vocab_size, sorted(eos)) if ignore_eos else None
    keys = KeyStream(seed)
    stats = GenerationStats(context_tokens=len(ctx.tokens))
    mx.reset_peak_memory()

    start = time.perf_counter()
    logits, hidden, stats.prompt_tokens = ctx.prefill(tokens)
    token = first_token(logits, settings, bias, keys)
    new = [token.item()]
    stats.prefill_seconds = time.perf_counter() - start
    policy = None
    if drafter is not None and draft_tokens is None:
        if 1 not in pair.costs:  # measured once per pair, on this machine
            pair.costs[1] = measure_costs([Row(ctx, token, hidden, keys)], drafter, k)
        policy = DraftPolicy(pair.costs[1])

    detok = pair.tokenizer.detokenizer
    detok.reset()
    emitted: list[int] = []
    rounds, last_round, plain = 0, None, None
    try:
        while True:
            stop_at, finish = answer_end(new, len(emitted), max_tokens, None if ignore_eos else eos)
            if finish:
                if plain:
                    plain.close()
                ctx.rewind(len(new) - 1 - stop_at)  # what follows the last token never counts
                new = new[: stop_at + 1]
            emitted += new
            stats.generated_tokens = len(emitted)
            stats.peak_memory_bytes = mx.get_peak_memory()
            for t in new:
                detok.add_token(t)
            if finish:
                detok.finalize()
                yield Chunk(detok.last_segment, new, stats, finish, last_round)
                return
            yield Chunk(detok.last_segment, new, stats, None, last_round)

            # Rounds that draft nothing are plain decoding, pipelined (engine/plain.py); every
            # PROBE_EVERY-th round is one of them, to measure the baseline (stats.py).
            handed = None
            round_k = 0
            if drafter is not None and rounds % PROBE_EVERY != PROBE_EVERY - 1:
                # A running plain pipeline hands over one more token before drafting starts.
                limit = max(0, min(k, max_tokens - len(emitted) - 1 - (plain is not None)))
                round_k = policy.choose(limit) if policy else limit
            if round_k == 0:
                plain = plain or PlainSteps(ctx, token, settings, bias, keys)
                result = plain.step()
            else:
                if plain:
                    handed, plain = plain.hand_over(), None
                    stats.add_round(handed.stats)
                    token, hidden = handed.token, handed.hidden
                result = run_round(ctx, drafter, token, hidden, round_k, settings, bias, keys)
                if handed:
                    result.tokens = handed.tokens + result.tokens
            if policy:
                policy.observe(result.stats)
            stats.add_round(result.stats)
            rounds += 1
            new, token, hidden, last_round = result.tokens, result.token, result.hidden, result.stats
    finally:
        if plain:  # an answer stopped early by its reader
            plain.close()
