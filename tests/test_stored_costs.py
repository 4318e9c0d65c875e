"""The costs a pair learned, kept from one process to the next (engine/stored_costs.py): written
at the end of an answer, read by the pair's first decoder, keyed by weights, machine and
versions; damaged or foreign files ignored; `--forget-costs`; what `doctor` shows."""

import json
import logging
import re
from collections import deque
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from rich.console import Console
from typer.testing import CliRunner

from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.engine import stored_costs
from gemma_mtp_mlx.engine.costs import DRIFT, POOL, Measurements, measurements_for
from gemma_mtp_mlx.engine.policy import BANKED_MOST, EXPLORE_ALLOWANCE
from gemma_mtp_mlx.engine.stored_costs import CostStore, costs_path, read_entries
from gemma_mtp_mlx.tools import doctor
from tests.test_chat import build_tiny
from tests.test_policy import measure

PROMPT = [2, 40, 77, 301, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A target with its drafter in `assistant/` (shared with test_chat and test_cli)."""
    return build_tiny(tmp_path_factory)


@pytest.fixture
def notes(caplog):
    caplog.set_level(logging.INFO, logger="gemma_chat.costs")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "gemma_chat.costs"]


def test_every_test_has_a_cache_folder_of_its_own(private_cache, monkeypatch, tmp_path):
    assert costs_path() == private_cache / "gemma-chat" / "costs.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert costs_path() == tmp_path / ".cache" / "gemma-chat" / "costs.json"


def test_a_second_load_starts_where_the_first_answer_stopped(tiny, clock, notes):
    """Two loads of one checkpoint are two pairs, as two processes would have: the second's
    first decoder reads what the first's answer wrote, drafts from its first round, and counts
    its rounds by the stored ratio (no plain step taken, none needed for the meter)."""
    first = load(str(tiny))
    chunks = []
    for chunk in generate(first, PROMPT, max_tokens=60, ignore_eos=True, draft_tokens=2):
        chunks.append(chunk)
        clock.now += 0.01
    assert any(c.round and c.round.measuring for c in chunks)
    assert notes() == [f"costs: none stored for this pair on this machine yet ({costs_path()})"]
    learned = measurements_for(first.target, first.drafter, first.compile)
    assert learned.rows(1).plain_ratio(2)
    (entry,) = read_entries(costs_path())
    assert entry["names"] == {"target": "target", "drafter": "assistant"}
    assert entry["key"]["compile"] is True and entry["key"]["precision"] == "float32 / float32"

    second = load(str(tiny))
    chunks = []
    for chunk in generate(second, PROMPT, max_tokens=30, ignore_eos=True, draft_tokens=2):
        chunks.append(chunk)
        clock.now += 0.01
    assert re.fullmatch(r"costs: starting from what a run on .+ learned \(.+\)", notes()[-1])
    carried = measurements_for(second.target, second.drafter, second.compile)
    assert carried is not learned
    assert carried.policy.accepted == pytest.approx(learned.policy.accepted)
    costs = carried.rows(1)
    assert list(costs.ratios[2]) == pytest.approx(list(learned.rows(1).ratios[2]))
    rounds = [c.round for c in chunks[1:]]
    assert rounds[0].drafted == 2 and not any(r.measuring for r in rounds)
    assert all(r.plain_steps == pytest.approx(1 / costs.plain_ratio(2)) for r in rounds if r.drafted == 2)
    assert not chunks[-1].stats.baseline_is_earlier
    # A carried plain step pairs with no round of this process: the ratios are as stored.
    assert len(costs.ratios[2]) == len(learned.rows(1).ratios[2])


def answer_as_a_process(tiny, clock, max_tokens: int) -> tuple[bool, list[float]]:
    """An answer of rounds of 2 by a pair loaded anew, as a fresh process would: whether it
    measured its plain step, and its pool of ratios for rounds of 2 after it."""
    pair = load(str(tiny))
    measured = False
    for chunk in generate(pair, PROMPT, max_tokens=max_tokens, ignore_eos=True, draft_tokens=2):
        measured |= bool(chunk.round and chunk.round.measuring)
        clock.now += 0.01
    return measured, list(measurements_for(pair.target, pair.drafter, pair.compile).rows(1).ratios[2])


def test_a_ratio_resting_on_fewer_measurements_than_the_pool_is_measured_again(tiny, clock):
    """A ratio stored from one measurement is one process's moment: each later process that
    drafts that K measures its plain step once, after its first rounds, until the pool holds
    POOL measurements that agree; from then on only the drift rule measures (here none: the
    clock runs alike for all)."""
    def answer(max_tokens: int) -> tuple[bool, int]:
        measured, pool = answer_as_a_process(tiny, clock, max_tokens)
        return measured, len(pool)

    assert answer(60) == (True, 1)  # a first process measures until it trusts its plain step
    assert [answer(200) for _ in range(POOL)] == [(True, 2), (True, 3), (False, 3)]


def test_a_pool_whose_measurements_disagree_is_measured_again(tiny, clock):
    """A full pool that holds a measurement more than DRIFT from another (the first processes
    after a cold start measure slow plain steps: a bench's first three pooled 0.49, 0.36 and
    0.33 for rounds of 3, later ones 0.31-0.37) counts every later process's rounds by a median
    it cannot trust: each process that drafts its K measures once more, the oldest making way,
    until the pool agrees."""
    for max_tokens in [60] + [200] * (POOL - 1):
        measured, pool = answer_as_a_process(tiny, clock, max_tokens)
    assert measured and len(pool) == POOL and max(pool) == min(pool)

    doc = json.loads(costs_path().read_text())
    doc["entries"][0]["rows"]["1"]["ratios"]["2"][0] *= 1 + 2 * DRIFT  # the oldest
    costs_path().write_text(json.dumps(doc))
    assert answer_as_a_process(tiny, clock, 200) == (True, pool)
    assert answer_as_a_process(tiny, clock, 200) == (False, pool)


def test_a_doubted_ratio_waits_in_the_file_for_the_next_process():
    """A ratio far from its pool is doubted until a measurement agrees with it. A process often
    ends first: the next one's measurement, agreeing, pools both, where measured against the
    pool alone it was doubted in turn and the pool kept one unlucky ratio for process after
    process (seen in a bench: a pool of one, 0.344 for rounds of 5, where later measurements
    gave 0.235-0.255; three processes drafting 5 read their baselines 20-30 % low)."""
    earlier = Measurements()
    measure(earlier.rows(1), 1.0, 3, 2.0)
    measure(earlier.rows(1), 0.6, 3, 2.0)  # 0.3 against 0.5: doubted
    assert list(earlier.rows(1).ratios[3]) == [0.5] and earlier.rows(1).doubted == {3: 0.3}
    later = Measurements()
    stored_costs.restore(later, json.loads(json.dumps(stored_costs.snapshot(earlier))))
    costs = later.rows(1)
    assert costs.doubted == {3: 0.3} and costs.stale
    measure(costs, 0.64, 3, 2.0)  # 0.32: agrees with the doubt
    assert list(costs.ratios[3]) == pytest.approx([0.5, 0.3, 0.32])
    assert costs.plain_ratio(3) == pytest.approx(0.32) and not costs.pool_settled(3)


def opened(pair, notes) -> tuple[Measurements, list[str]]:
    m = Measurements()
    CostStore.open(pair, m, compile=False)
    return m, notes()


def write_entry(pair, change) -> None:
    """Store `pair`'s costs after a short answer, then edit the file with `change(doc)`."""
    m = Measurements()
    store = CostStore.open(pair, m, compile=False)
    m.rows(1).plain, m.rows(1).rounds = 0.01, {2: 0.015}
    m.rows(1).ratios[2] = deque([0.7])
    m.budget.balance, m.budget.lowest = 12.5, -1.0
    store.save(m)
    doc = json.loads(costs_path().read_text())
    change(doc)
    costs_path().write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def pair(tiny):
    return load(str(tiny))


def test_stored_costs_round_trip_through_the_file(pair, notes):
    write_entry(pair, lambda doc: None)
    m, said = opened(pair, notes)
    assert said[-1].startswith("costs: starting from")
    c = m.rows(1)
    assert (c.plain, c.rounds, list(c.ratios[2]), c.carried) == (0.01, {2: 0.015}, [0.7], True)
    assert c.current_plain == pytest.approx(0.7 * 0.015) and c.trusted
    assert (m.budget.balance, m.budget.lowest) == (12.5, -1.0)


def test_a_file_from_before_the_budget_was_stored_starts_the_budget_afresh(pair, notes):
    write_entry(pair, lambda doc: doc["entries"][0]["policy"].pop("budget"))
    m, said = opened(pair, notes)
    assert said[-1].startswith("costs: starting from") and m.rows(1).plain == 0.01
    assert (m.budget.balance, m.budget.lowest) == (EXPLORE_ALLOWANCE, 0.0)


@pytest.mark.parametrize(
    "content, why",
    [
        ("{ not json", "it is not JSON (damaged)"),
        ('{"format": "someone-else", "entries": []}', "it is not a gemma-chat costs file"),
        ('{"format": "gemma-chat.costs", "version": 99, "entries": []}', "format version 99"),
        ('{"format": "gemma-chat.costs", "version": 1, "entries": {}}', "its entries are damaged"),
    ],
)
def test_a_damaged_or_foreign_file_is_ignored_and_replaced(pair, notes, content, why):
    costs_path().parent.mkdir(parents=True, exist_ok=True)
    costs_path().write_text(content)
    m, said = opened(pair, notes)
    assert not m.by_rows
    assert said[-1].startswith(f"costs: ignoring {costs_path()}: {why}")
    store = CostStore.open(pair, m, compile=False)
    m.rows(1).plain = 0.02
    store.save(m)
    assert read_entries(costs_path())[0]["rows"]["1"]["plain"] == 0.02


@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e["rows"]["1"].update(plain=-1.0),
        lambda e: e["rows"]["1"].update(plain="fast"),
        lambda e: e["rows"]["1"]["ratios"].update({"2": []}),
        lambda e: e["rows"]["1"]["ratios"].update({"4": [0.5]}),  # no rounds of 4 to go by
        lambda e: e["rows"]["1"]["rounds"].update({"0": 0.1}),
        lambda e: e["rows"]["1"].update(doubted={"2": -0.5}),
        lambda e: e["policy"].update(seen=[1.0]),
        lambda e: e["policy"].update(accepted=[9.0] * 6),
        lambda e: e.pop("rows"),
        lambda e: e["policy"]["budget"].update(balance=BANKED_MOST + 1),
        lambda e: e["policy"]["budget"].update(lowest=0.5),
        lambda e: e["policy"]["budget"].update(balance="plenty"),
    ],
)
def test_a_damaged_entry_is_ignored(pair, notes, edit):
    write_entry(pair, lambda doc: edit(doc["entries"][0]))
    m, said = opened(pair, notes)
    assert not m.by_rows and m.policy.seen == [0.0] * m.policy.max_draft
    assert m.budget.balance == EXPLORE_ALLOWANCE
    assert said[-1] == f"costs: ignoring {costs_path()}: this pair's entry is damaged"


@pytest.mark.parametrize(
    "field, value",
    [("machine", "Darwin arm64, Apple M3, 8 cores, MLX gpu"), ("gemma_chat", "0.0.1"), ("mlx", "0.1"),
     ("compile", True), ("drafter", "0" * 64)],
)
def test_costs_measured_elsewhere_are_not_used_here(pair, notes, field, value):
    write_entry(pair, lambda doc: doc["entries"][0]["key"].update({field: value}))
    m, said = opened(pair, notes)
    assert not m.by_rows
    assert said[-1].startswith("costs: none stored for this pair on this machine yet")


def test_the_key_tells_weights_precision_and_compile_mode_apart(pair, tiny):
    key = stored_costs.pair_key(pair.target, pair.drafter, compile=False)
    assert stored_costs.pair_key(pair.target, pair.drafter, compile=True) == key | {"compile": True}
    name, weight = tree_flatten(pair.drafter.parameters())[-1]
    pair.drafter.update(tree_unflatten([(name, weight + 1e-3)]))
    try:
        nudged = stored_costs.pair_key(pair.target, pair.drafter, compile=False)
    finally:
        pair.drafter.update(tree_unflatten([(name, weight)]))
    assert nudged == key | {"drafter": nudged["drafter"]} and nudged["drafter"] != key["drafter"]
    half = load(str(tiny))
    half.target.set_dtype(mx.bfloat16)
    half = stored_costs.pair_key(half.target, half.drafter, compile=False)
    assert half["precision"] == "bfloat16 / float32" and half["target"] != key["target"]
    quantized = load(str(tiny), quantize=4)
    assert stored_costs.pair_key(quantized.target, quantized.drafter, compile=False)["precision"] == "4-bit / float32"


def gemma(*args: str):
    return CliRunner().invoke(app, list(args))


def test_the_cli_stores_says_under_verbose_and_forgets(tiny):
    ask = ("--model", str(tiny), "--prompt", "Hello", "-n", "12", "--ignore-eos", "--verbose")
    r = gemma(*ask)
    assert r.exit_code == 0, r.output
    assert "costs: none stored for this pair on this machine yet" in r.stderr
    assert costs_path().is_file()
    r = gemma(*ask)
    assert "costs: starting from what a run on" in r.stderr
    assert "costs:" not in gemma(*ask[:-1]).stderr  # only under --verbose
    r = gemma("--forget-costs")
    assert r.exit_code == 0 and not r.stdout
    assert f"forgot the stored costs ({costs_path()})" in r.stderr and not costs_path().exists()
    assert "no stored costs to forget" in gemma("--forget-costs").stderr
    costs_path().write_text("garbage")
    r = gemma("--forget-costs", *ask)
    assert r.exit_code == 0 and "forgot the stored costs" in r.stderr
    assert "costs: none stored for this pair" in r.stderr and read_entries(costs_path())


def test_doctor_shows_what_is_stored(pair):
    def report() -> str:
        console = Console(record=True, width=200)
        doctor.stored_costs_report(console)
        return console.export_text()

    assert f"stored costs: none yet ({costs_path()})" in report()
    write_entry(pair, lambda doc: None)
    text = report()
    assert "target + assistant · float32 / float32 · this machine" in text
    assert "1 row: plain step 10.5 ms (95 tok/s); a round of K=2 15.0 ms" in text
    assert re.search(r"acceptance by draft position: (0\.60 ){5}0\.60", text)
    assert "what drafting may still lose: 12.5 plain steps\n" in text
    costs_path().write_text("{}")
    assert "is ignored: it is not a gemma-chat costs file" in report()
