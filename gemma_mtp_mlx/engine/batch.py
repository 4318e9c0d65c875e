"""Several prompts answered at once (`gemma-chat --prompt-file FILE --batch B`).

Every row keeps its own context and decodes exactly as its own run would; what the rows share
is the target forward of each round: all rows' verify blocks go through the target together,
so its weights are read once per round for the whole batch (on a MoE, the experts that several
rows pick are read once). Each row is prefilled on its own (prompts differ in length), drafts
on its own, and accepts and rolls back on its own (models/cache.RowsCache), so rows need no
padding and a row's tokens are exactly its single-run tokens. Finished rows leave the batch.
"""

import time
from dataclasses import dataclass

from .context import Context
from .generate import answer_end, encode_prompt, first_token, generate, most_drafts
from .policy import DraftPolicy, measure_costs
from .sampling import SamplerSettings, ban_bias
from .speculative import KeyStream, Row, run_rows
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
    max_tokens: int | list[int] = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    mtp: bool = True,
    draft_tokens: int | None = None,
    ignore_eos: bool = False,
    raw: bool = False,
) -> list[Answer]:
    """Answers to `prompts` (anything `encode_prompt` takes), in order. Each row's tokens are
    those of `generate` on its own (greedy); sampled rows draw from their own key stream
    (seed + row) and follow the target's distribution exactly. The draft length per round comes
    from costs measured for this many rows and the acceptance of all rows so far, unless fixed.
    `max_tokens` may be one limit per row."""
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    options = dict(
        max_tokens=limits[0], temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    options |= dict(mtp=mtp, draft_tokens=draft_tokens, ignore_eos=ignore_eos, raw=raw)
    if len(prompts) == 1:  # a batch of one is a single run (pipelined when it parks)
        chunks = list(generate(pair, prompts[0], **options))
        return [
            Answer(
                [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason, chunks[-1].stats
            )
        ]
    drafter = pair.drafter if mtp else None
    k = most_drafts(drafter, draft_tokens)
    settings = SamplerSettings(temperature, top_k, top_p)
    eos = set(pair.tokenizer.eos_token_ids)
    bias = ban_bias(pair.target.args.vocab_size, sorted(eos)) if ignore_eos else None
    if ignore_eos:
        eos = None
    base_seed = seed if seed is not None else time.time_ns() % 2**32

    rows, answers = [], []
    for i, prompt in enumerate(prompts):
        ctx = Context(pair.target, slack=max(64, k + 2))
        keys = KeyStream(base_seed + i)
        stats = GenerationStats()
        logits, hidden, stats.prompt_tokens = ctx.prefill(
            encode_prompt(pair.tokenizer, prompt, raw=raw)
        )
        token = first_token(logits, settings, bias, keys)
        rows.append(Row(ctx, token, hidden, keys))
        answers.append(Answer([], "", stats))
        _take(answers[i], [token.item()], limits[i], eos)

    policy = None
    if drafter is not None and draft_tokens is None:
        if len(rows) not in pair.costs:  # measured once per pair and batch size
            pair.costs[len(rows)] = measure_costs(rows, drafter, k)
        policy = DraftPolicy(pair.costs[len(rows)])

    active = [i for i, a in enumerate(answers) if not a.finish_reason]
    while active:
        round_k = policy.choose(k) if policy else k
        results = run_rows([rows[i] for i in active], drafter, round_k, settings, bias)
        for i, result in zip(active, results):
            rows[i].token, rows[i].hidden = result.token, result.hidden
            answers[i].stats.add_round(result.stats)
            _take(answers[i], result.tokens, limits[i], eos)
            if policy:  # each row's acceptance counts; the round's time once per row
                policy.observe(result.stats)
        active = [i for i in active if not answers[i].finish_reason]
    return answers


def _take(answer: Answer, new: list[int], max_tokens: int, eos: set[int] | None) -> None:
    """Append a round's tokens to a row's answer, up to where the answer ends."""
    stop_at, finish = answer_end(new, len(answer.token_ids), max_tokens, eos)
    answer.token_ids += new[: stop_at + 1]
    answer.stats.generated_tokens = len(answer.token_ids)
    answer.finish_reason = finish or ""
