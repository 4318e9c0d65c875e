"""vLLM's speculative-decoding counters, read from its Prometheus `/metrics` page.

vLLM counts drafts, drafted tokens and accepted tokens for the whole server. Read before and
after an answer, the difference is that answer's, provided nothing else ran meanwhile (the
meter says these are the server's figures for the time of the answer). vLLM measures no plain
baseline, so there is no speedup to show.
"""

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "drafted": "vllm:spec_decode_num_draft_tokens",
    "accepted": "vllm:spec_decode_num_accepted_tokens",
}


@dataclass
class SpecCounters:
    drafts: float  # verify rounds that carried drafts
    drafted: float
    accepted: float

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        return SpecCounters(
            self.drafts - other.drafts, self.drafted - other.drafted, self.accepted - other.accepted
        )


def spec_counters(exposition: str) -> SpecCounters | None:
    """The counters summed over every label set (engines, models); None when the page has none
    (speculative decoding is off, or this is not vLLM)."""
    totals: dict[str, float] = {}
    wanted = {name: key for key, name in COUNTERS.items()}
    try:
        families = list(text_string_to_metric_families(exposition))
    except ValueError:  # not a Prometheus page at all
        return None
    for family in families:
        key = wanted.get(family.name)
        if key is not None:
            totals[key] = sum(s.value for s in family.samples if s.name == family.name + "_total")
    if set(totals) != set(COUNTERS):
        return None
    return SpecCounters(**totals)
