"""The benchmark on tiny models: every run reproduces plain decoding, the simulated drafter's
acceptance is what it was set to, the shapes keep the real layer pattern, and the reports hold
sane figures. No timing is asserted (speed goals live in the benchmark, not here)."""

import dataclasses
import io
import json
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from rich.console import Console
from typer.testing import CliRunner

from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.engine.context import Context
from gemma_mtp_mlx.models.configs import FULL, SLIDING, TARGETS
from gemma_mtp_mlx.models.gemma4 import Model, ModelArgs
from gemma_mtp_mlx.tools import bench
from gemma_mtp_mlx.tools.bench import costs, peers, shapes
from gemma_mtp_mlx.tools.bench.measure import run_ours
from gemma_mtp_mlx.tools.bench.pair_bench import run_bench
from gemma_mtp_mlx.tools.bench.render import render_pair
from gemma_mtp_mlx.tools.bench.shape_bench import run_shape_bench
from gemma_mtp_mlx.tools.bench.simulated import Proposals, SimulatedDrafter

PROMPT = [2, 40, 77, 301, 12]


def tiny_shape(name: str, layers: int) -> shapes.Shape:
    """A real shape's first `layers` layers (pattern, KV sharing, PLE, MoE, k_eq_v, centroid
    head) with tiny widths and a 512-token vocabulary."""
    s = shapes.shape(name, layers, 512)
    target = dict(
        s.target, hidden_size=64, intermediate_size=96, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=16,
        max_position_embeddings=4096,
    )
    text = dict(
        s.assistant["text_config"], hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=32, sliding_window=16,
    )
    for config in (target, text):
        if config.get("num_global_key_value_heads"):
            config["num_global_key_value_heads"] = 1
    if target.get("hidden_size_per_layer_input"):
        target["hidden_size_per_layer_input"] = 8
    if target.get("enable_moe_block"):
        target.update(num_experts=8, top_k_experts=2, moe_intermediate_size=32)
    assistant = dict(s.assistant, backbone_hidden_size=64, text_config=text)
    if assistant["use_ordered_embeddings"]:
        assistant.update(num_centroids=32, centroid_intermediate_top_k=4)
    return shapes.Shape(name, target, assistant, s.note)


@pytest.fixture(scope="module")
def tiny_pairs():
    return {name: shapes.build(tiny_shape(name, 6)) for name in ("e2b", "26b")}


# -- shapes ------------------------------------------------------------------------------------
def test_kept_layers_keep_the_real_pattern_and_kv_sharing():
    assert shapes.kept_layers("e2b", 35) == (TARGETS["e2b"]["layer_types"], 20)
    types, shared = shapes.kept_layers("e2b", 10)
    assert types == ([SLIDING] * 4 + [FULL]) * 2 and shared == 5
    types, shared = shapes.kept_layers("e4b", 12)
    assert types == ([SLIDING] * 5 + [FULL]) * 2 and shared == 5
    # Two layers: a sliding and a full one, both keeping their own K/V for the drafter.
    assert shapes.kept_layers("26b", 2) == ([SLIDING, FULL], 0)
    assert shapes.kept_layers("e2b", 6) == ([SLIDING] * 4 + [FULL] * 2, 1)


def test_fit_takes_fewer_layers_then_a_smaller_vocabulary_as_memory_shrinks():
    full, _ = shapes.weight_bytes(shapes.shape("e2b", 35))
    assert shapes.fit("e2b", None, 2 * full).layers == 35
    small = shapes.fit("e2b", None, full // 3)
    assert 2 <= small.layers < 35 and small.vocab == TARGETS["e2b"]["vocab_size"]
    tiny = shapes.fit("31b", None, 6 * 2**30)  # two 31B layers need ~11 GB at the real vocabulary
    assert tiny.vocab < TARGETS["31b"]["vocab_size"] and tiny.assistant["text_config"]["vocab_size"] == tiny.vocab
    with pytest.raises(Exception, match="GiB"):
        shapes.fit("26b", 4, 2**30)


def test_step_bytes_count_the_head_and_only_the_experts_a_token_routes_to():
    assert shapes.step_bytes(shapes.shape("e2b"))["lm_head"] == 262144 * 1536 * 4
    moe = shapes.shape("26b", 2)
    target = Model(ModelArgs.from_config(moe.target))  # not evaluated: nothing is allocated
    total = sum(v.size * 4 for _, v in tree_flatten(target.parameters()))
    read = shapes.step_bytes(moe)
    experts = 2 * 128 * 3 * 2816 * 704 * 4
    assert read["lm_head"] == 262144 * 2816 * 4
    assert read["layers"] == total - read["lm_head"] - experts + experts * 8 // 128


def test_tiny_shapes_decode_the_same_with_mlx_lm(tiny_pairs):
    for name, pair in tiny_pairs.items():
        args = pair.target.args
        assert args.enable_moe_block == (name == "26b")
        assert bool(args.hidden_size_per_layer_input) == (name == "e2b")
        assert pair.drafter.args.use_ordered_embeddings == (name == "e2b")
        ours = run_ours(pair, PROMPT, 24, mtp=False).tokens
        assert len(set(ours)) > 4, "a random model that repeats one token routes every token alike"
        twin = peers.mlx_lm_twin(pair.target)
        assert peers.run_mlx_lm(twin, pair.tokenizer, PROMPT, 24).tokens == ours


# -- the simulated drafter ---------------------------------------------------------------------
def leading_hits_of_each_round(rounds: list[tuple[int, int]], hits, start: int) -> list[int]:
    """What each drafting round must accept: the hits in a row from the position after its
    newest token (`start` for the first round); a draft past the reference misses. A plain
    step moves one position on."""
    expected, position = [], start
    for drafted, accepted in rounds:
        if drafted:
            lead = 0
            while lead < drafted and position + 1 + lead < len(hits) and hits[position + 1 + lead]:
                lead += 1
            expected.append(lead)
            position += accepted + 1
        else:
            position += 1
    return expected


def test_simulated_drafts_hit_at_the_set_rate_and_output_stays_plain(tiny_pairs):
    pair = tiny_pairs["e2b"]
    plain = run_ours(pair, PROMPT, 300, mtp=False).tokens
    for a, k, n in ((0.7, 3, 300), (0.0, 2, 60), (1.0, 4, 60)):
        proposals = Proposals(PROMPT + plain, a, pair.target.args.vocab_size)
        simulated = dataclasses.replace(pair, drafter=SimulatedDrafter(pair.drafter, proposals))
        run = run_ours(simulated, PROMPT, n, mtp=True, k=k)
        assert run.tokens == plain[:n]
        # Every round accepts exactly its drafts' leading hits, wherever the engine's plain steps
        # put it, so the acceptance measured is the draws' own rate.
        drafting = [r for r in run.rounds if r[0]]
        assert [accepted for _, accepted in drafting] == leading_hits_of_each_round(
            run.rounds, proposals.hits, len(PROMPT)
        )
        if a == 1.0:  # every drafting round but the last accepts all K
            assert all(r == (k, k) for r in drafting[:-1]) and len(drafting) > 5
        if a == 0.0:
            assert run.acceptance == 0.0
    # The draws themselves hit at the set rate (seed 0, so the same every run; 0.01 is about
    # three standard deviations of a rate drawn 20000 times).
    for a in (0.3, 0.7, 0.9):
        assert abs(Proposals(list(range(20000)), a, 512).hits.mean() - a) < 0.01


def test_the_ideal_replays_the_rounds_the_engine_really_runs(tiny_pairs, monkeypatch):
    """The bench's ideal counts the rounds fixed K makes for the run's own hits: they must be
    the engine's (with the baseline measured beforehand and kept, so no plain burst shifts the
    positions)."""
    from gemma_mtp_mlx.engine import costs as engine_costs

    monkeypatch.setattr(engine_costs, "DRIFT", float("inf"))
    pair = tiny_pairs["e2b"]
    plain = run_ours(pair, PROMPT, 80, mtp=False).tokens
    proposals = Proposals(PROMPT + plain, 0.7, pair.target.args.vocab_size, seed=3)
    simulated = dataclasses.replace(pair, drafter=SimulatedDrafter(pair.drafter, proposals))
    for _ in range(2):  # measures the baseline (the first time provisionally)
        run_ours(simulated, PROMPT, 30, mtp=True, k=3)
    for k in (1, 3, 4):
        run = run_ours(simulated, PROMPT, 80, mtp=True, k=k)
        assert [d for d, _ in run.rounds] == costs.replayed_rounds(proposals.hits, len(PROMPT), 80, k)


def test_the_simulated_proposal_depends_on_the_drafter_network(tiny_pairs):
    """MLX computes only what an output depends on, and folds an argmax over one candidate into
    a constant: the engine's pick (argmax over the candidate scores, mapped through the ids)
    must still depend on the real drafter's layers and head."""
    pair = tiny_pairs["e2b"]
    ctx = Context(pair.target)
    _, hidden, _ = ctx.prefill(PROMPT)
    mx.eval(hidden, [(c.keys, c.values) for c in ctx.cache])
    proposals = Proposals(PROMPT + [9] * 8, 1.0, pair.target.args.vocab_size)
    simulated = SimulatedDrafter(pair.drafter, proposals)
    kv = pair.target.drafter_kv(ctx.cache, simulated.sliding_window)
    y, _ = simulated(pair.target.model.embed(mx.array([[PROMPT[-1]]])), hidden, kv)
    ids, scores = simulated.candidate_logits(y[:, 0])
    pick = mx.take_along_axis(ids, mx.argmax(scores, axis=-1)[:, None], axis=-1)
    graph = io.StringIO()
    mx.export_to_dot(graph, pick)
    assert graph.getvalue().count('"Matmul"') >= 2 * len(pair.drafter.model.layers)
    assert pick.item() == 9


def test_mlx_vlm_meets_the_same_simulated_drafter(tiny_pairs):
    pytest.importorskip("mlx_vlm")
    pair = tiny_pairs["e2b"]  # the MoE shape meets it in the shape bench's test
    plain = run_ours(pair, PROMPT, 200, mtp=False).tokens
    proposals = Proposals(PROMPT + plain, 0.6, pair.target.args.vocab_size)
    model = peers.vlm_target(pair.target, peers.eos_bias(pair.target, pair.tokenizer))
    run = peers.run_mlx_vlm(model, peers.vlm_drafter(pair.drafter, proposals), PROMPT, 200, 4)
    assert run.tokens == plain
    assert abs(run.acceptance - 0.6) < 0.12, run.acceptance  # ~150 drafts reached: 2.5 sd


def test_mlx_vlm_with_the_real_drafter_decodes_like_ours(echo_pairs):
    """Its multimodal model and assistant hold our arrays; greedy MTP reproduces ours plain
    (end of sequence masked the same way) for the PLE, MoE and dense k_eq_v shapes."""
    pytest.importorskip("mlx_vlm")
    for shape in ("e2b", "moe", "dense"):
        pair = echo_pairs[(shape, shape == "e2b")]
        ours = run_ours(pair, PROMPT, 40, mtp=False).tokens
        model = peers.vlm_target(pair.target, peers.eos_bias(pair.target, pair.tokenizer))
        run = peers.run_mlx_vlm(model, peers.vlm_drafter(pair.drafter), PROMPT, 40, 4)
        assert run.tokens == ours, shape
        assert run.accepted > 0, shape  # the echo drafter agrees when the target repeats


# -- the reports -------------------------------------------------------------------------------
def test_shape_bench_json_holds_every_row_with_sane_figures(tiny_pairs, tmp_path):
    pair = tiny_pairs["26b"]
    s = tiny_shape("26b", 6)
    result = run_shape_bench(pair, s, [0.5, 0.9], max_tokens=24, repeats=1, cost_reps=1, prompt_tokens=16)
    json.dumps(result)
    for key in ("shape", "layers", "vocab", "machine", "plain_tps", "mlx_lm_tps", "outputs_identical", "rows"):
        assert key in result, key
    assert result["shape"] == "26b" and result["layers"] == 6 and result["vocab"] == 512
    assert result["step_bytes"]["full"]["lm_head"] == 262144 * 2816 * 4
    assert result["outputs_identical"] is True
    assert "simulated" in result["simulated"]
    variants = ["policy", "k1", "k2", "k3", "k4"]
    if peers.mlx_vlm_missing() is None:
        variants.append("mlx_vlm")
    assert [(r["acceptance_target"], r["variant"]) for r in result["rows"]] == [
        (a, v) for a in (0.5, 0.9) for v in variants
    ]
    plain = result["plain_tps"]
    for r in result["rows"]:
        assert r["identical"]
        assert r["speedup"] == pytest.approx(r["tps"] / plain, rel=0.01)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"], rel=0.01)
        assert r["ideal"] > 0 and r["ideal_expected"] > 0
        if r["variant"] == "policy" and r["acceptance"] is None:  # parked the whole run
            assert r["tokens_per_forward"] == 1
        else:
            assert 0 <= r["acceptance"] <= 1 and r["tokens_per_forward"] >= 1
        if r["variant"] == "k1":  # one draft: at most 2 tokens per forward
            assert r["tokens_per_forward"] <= 2
        if r["variant"] != "mlx_vlm" and "mlx_vlm" in variants:
            assert r["vs_mlx_vlm"] > 0
    ideal = {(r["acceptance_target"], r["variant"]): r["ideal"] for r in result["rows"]}
    expected = {(r["acceptance_target"], r["variant"]): r["ideal_expected"] for r in result["rows"]}
    assert expected[0.9, "k3"] > expected[0.5, "k3"]  # more acceptance, more promised
    assert ideal[0.5, "policy"] == max(ideal[0.5, v] for v in variants if v != "mlx_vlm")
    assert set(result["goals"]) >= {"policy_efficiency", "vs_mlx_vlm", "plain_vs_mlx_lm"}
    # The speed story, drawn again from the saved JSON without running anything.
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(result))
    shown = CliRunner().invoke(app, ["bench", "--from-json", str(saved), "--plot", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    # Rich wraps at 80 columns: between words, and inside a long path.
    assert "simulated acceptance 0.90" in " ".join(shown.output.split())
    assert f"{tmp_path / 'speed-26b.svg'}" in shown.output.replace("\n", "")
    svg = (tmp_path / "speed-26b.svg").read_text()
    for label in ("K per round by the policy", "the best fixed K", "ideal", result["machine"]["cpu"]):
        assert label in svg, label
    assert ("mlx-vlm MTP" in svg) == ("mlx_vlm" in variants)
    bad = CliRunner().invoke(app, ["bench", "--from-json", str(tmp_path / "missing.json")])
    assert bad.exit_code == 1 and "cannot read a bench result" in bad.output


def test_quick_pair_bench_reports_every_field_with_identical_outputs(echo_pairs):
    pair = echo_pairs[("dense", False)]
    result = run_bench(pair, max_tokens=16, repeats=1, quick=True, ks=(1, 3), cost_reps=1)
    json.dumps(result)
    assert result["outputs_identical"] is True
    assert set(result["workloads"]) == {"prose", "code", "structured", "long"}
    assert result["workloads"]["long"]["prompt_tokens"] > pair.target.args.sliding_window
    for w in result["workloads"].values():
        assert w["plain"]["generated_tokens"] == w["mtp"]["generated_tokens"] == 16
        assert w["mlx_lm"]["identical_to_plain"] and w["plain_again"]["identical_to_plain"]
        for run in w.values():
            if isinstance(run, dict) and "tokens_per_second" in run:
                assert run["best_tokens_per_second"] >= run["tokens_per_second"]  # fastest vs median
    prose = result["workloads"]["prose"]
    assert set(result["k_sweep"]) == {"1", "3"}
    # The echo drafter agrees whenever the target repeats; fixed K always drafts.
    assert result["k_sweep"]["1"]["acceptance_rate"] > 0 and prose["k1"]["acceptance"] > 0
    assert not result["never_hit"]["acceptance_rate"]  # 0, or None when it parked before drafting
    # One repeat: the paired ratio is that repeat's, the median's too.
    never = result["never_hit"]
    assert never["vs_plain_paired"] == pytest.approx(never["vs_plain"], abs=0.002)
    assert result["goals"]["never_hit_vs_plain"]["value"] == never["vs_plain_paired"]
    # Quick: fixed K on prose only, so the policy is held against prose's best K alone.
    best_k = max(prose["k1"]["tokens_per_second"], prose["k3"]["tokens_per_second"])
    policy_goal = result["goals"]["policy_vs_best_k"]
    assert policy_goal["value"] == round(prose["mtp"]["tokens_per_second"] / best_k, 3)
    assert policy_goal["met"] == (policy_goal["value"] >= 0.9)
    errors = [run["baseline_error_paired"] for w in result["workloads"].values()
              for run in w.values() if isinstance(run, dict) and "baseline_error_paired" in run]
    assert len(errors) >= 4  # plain on every workload at least
    within = sum(0.9 <= e <= 1.1 for e in errors) / len(errors)
    assert result["goals"]["meter_within_10pct"]["value"] == pytest.approx(within, abs=0.001)
    # Plain decoding's meter counts its own steady steps: a baseline and a speedup of its own.
    assert prose["plain"]["baseline_error"] > 0 and prose["plain"]["meter_speedup"] > 0
    if peers.mlx_vlm_missing() is None:
        assert prose["mlx_vlm"]["identical_to_plain"] and result["mlx_vlm_mtp_tokens_per_second"] > 0
    assert result["weights_bytes"]["drafter"] > 0
    assert isinstance(result["machine"]["openblas_preload"], bool)
    # The same work twice: ours plain again, paired with ours plain, on every workload.
    same = result["identical_work"]
    by_workload = {n: w["plain_again"]["vs_plain_paired"] for n, w in result["workloads"].items()}
    assert same == by_workload and min(same.values()) > 0
    shown = io.StringIO()
    render_pair(result, Console(file=shown, width=200))
    line = f"the same work twice (ours plain, again each repeat, paired): {min(same.values()):.2f}-"
    assert line in shown.getvalue()


def test_cost_curve_has_nine_ratios_relative_to_one_token(echo_pairs):
    pair = echo_pairs[("e2b", True)]
    curve = costs.cost_curve(pair.target, pair.drafter, context=16, reps=1)
    assert len(curve["ratios"]) == 9 and curve["ratios"][0] == 1.0
    assert all(r > 0 for r in curve["ratios"])
    assert curve["drafter_step_ratio"]["dense_head"] > 0
    assert curve["drafter_step_ratio"]["centroid_head"] > 0
    # Acceptance 0 promises a loss for every K; perfect acceptance more tokens per round.
    assert costs.ideal_speedup(0, 0.5, curve, "dense_head") == 1.0
    assert costs.ideal_speedup(2, 0.0, curve, "dense_head") < 1.0
    assert costs.expected_tokens(3, 1.0) == 4 and costs.expected_tokens(2, 0.5) == 1.75


def test_the_ideal_replays_the_rounds_of_the_runs_own_hits():
    """The first token (the prefill's) sits at position 10; drafts start at 11."""
    hits = [False] * 11 + [True, True, False, True, True, True, True, True, True, True]
    # K = 2, by hand: round 1 drafts 11 and 12 (both hit: they and the target's 13 are out),
    # round 2 drafts 14 and 15 (both hit), round 3 would draft 17 and 18 but an answer of 9
    # tokens has room for one more draft only.
    assert costs.replayed_rounds(hits, 10, 9, 2) == [2, 2, 1]
    assert costs.replayed_rounds(hits, 10, 9, 0) == [0] * 8  # plain: a step per token
    # Never a hit: one token per round, the draft length shrinking towards the end.
    assert costs.replayed_rounds([False] * 30, 10, 6, 3) == [3, 3, 2, 1, 0]
    curve = {"target_seconds": [1.0, 1.2, 1.2, 1.3], "drafter_step_seconds": {"h": 0.1}}
    # 8 plain steps against rounds costing 1.4 + 1.4 + 1.3.
    assert costs.ideal_for_hits(2, hits, 10, 9, curve, "h") == pytest.approx(8 / 4.1)
    assert costs.ideal_for_hits(0, hits, 10, 9, curve, "h") == 1.0


def test_mlx_lm_twin_decodes_like_ours(pairs):
    """mlx-lm's own model class, holding our weights, gives the same greedy tokens (MoE,
    k_eq_v and per-layer-embedding shapes alike)."""
    for shape in ("e2b", "moe", "dense"):
        pair = pairs[(shape, False)]
        twin = peers.mlx_lm_twin(pair.target)
        ours = run_ours(pair, PROMPT, 30, mtp=False).tokens
        assert peers.run_mlx_lm(twin, pair.tokenizer, PROMPT, 30).tokens == ours, shape


def test_moe_curve_on_tiny_dims():
    """`bench --moe-curve` with the dims shrunk: ours and mlx-lm's model on the same weights."""
    config = costs.moe_config(
        2, hidden_size=64, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        intermediate_size=64, vocab_size=512, num_attention_heads=2, num_key_value_heads=1,
        num_global_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=64,
    )
    result = costs.moe_curve(config, context=16, reps=1)
    json.dumps(result)
    assert result["tokens"] == list(range(1, 10))
    for key in ("ours_ms", "mlx_lm_ms"):
        assert len(result[key]) == 9 and all(ms > 0 for ms in result[key])
    assert result["layers"] == 2


# -- the command -------------------------------------------------------------------------------
def test_command_line_quick_json(ckpt, capsys):
    """The pair bench end to end through `load`, with a random (never agreeing) drafter."""
    result = bench.run(
        model=str(ckpt["dense"]), drafter=str(ckpt["dense-assistant"]), max_tokens=8, quick=True,
        as_json=True,
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["outputs_identical"] is True
    assert printed["speedup"] == result["speedup"]


def test_bench_options_are_checked_before_anything_loads():
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--shape", "e2b", "--acceptance", "0.6,1.5"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["bench", "--shape", "e3b", "--layers", "2"])
    assert result.exit_code == 1 and "unknown shape" in result.output


def test_the_cli_imports_no_bench_and_no_distillation():
    code = (
        "import sys, gemma_mtp_mlx.cli; "
        "print([m for m in sys.modules if m.startswith(('gemma_mtp_mlx.tools', 'mlx_vlm'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_meter_is_held_against_the_plain_run_of_its_own_repeat():
    """Synthetic runs on a machine that slows down by half between two repeats: paired by
    repeat, a meter that reported each run's own plain speed is exact; against the median plain
    run it would look 25-50 % off."""
    from gemma_mtp_mlx.engine.stats import GenerationStats
    from gemma_mtp_mlx.tools.bench.measure import Run, Variant
    from gemma_mtp_mlx.tools.bench.report import paired_meter

    def run(tps: float, baseline: float | None = None) -> Run:
        stats = None
        if baseline is not None:  # 100 tokens decoded in 100 / tps seconds, baseline measured
            stats = GenerationStats(decoded_tokens=100, decode_seconds=100 / tps)
            stats.baseline_steps, stats.baseline_seconds = 10, 10 / baseline
        return Run(list(range(101)), 100 / tps, 0, stats)

    plain = Variant("plain", None, [run(200.0), run(100.0)])
    mtp = Variant("mtp", None, [run(300.0, baseline=200.0), run(150.0, baseline=100.0)])
    assert paired_meter(mtp, plain) == {"baseline_error_paired": 1.0, "meter_vs_real_paired": 1.0}
    wrong = Variant("mtp", None, [run(300.0, baseline=150.0), run(150.0, baseline=75.0)])
    assert paired_meter(wrong, plain)["baseline_error_paired"] == 0.75
    assert paired_meter(Variant("mlx_lm", None, [run(200.0)]), plain) == {}


def test_meter_share_counts_baselines_exactly_ten_percent_off_as_within():
    """The errors are rounded to three places, so 1.1 and 0.9 occur; both are within 10 %.
    (Counted as abs(e - 1) <= 0.1, 1.1 fell outside: float 1.1 - 1 is 0.10000000000000009.)"""
    from gemma_mtp_mlx.tools.bench.pair_bench import _meter_within

    results = {
        "prose": {"plain": {"baseline_error_paired": 1.1}, "mtp": {"baseline_error_paired": 0.9}},
        "code": {"k1": {"baseline_error_paired": 1.101}, "mlx_lm": {"tokens_per_second": 9.0}},
    }
    assert _meter_within(results) == round(2 / 3, 3)


# -- fresh processes -----------------------------------------------------------------------------
def test_fresh_processes_alternate_share_the_stored_costs_and_hold_the_goals(capsys):
    """The orchestration and the arithmetic, on answers made up per variant (each a real process
    takes seconds; the next test runs one): a policy whose meter reads 20 % high without stored
    costs misses the 15 % goal there and meets every goal with them."""
    from gemma_mtp_mlx.tools.bench import fresh, render

    calls = []

    def answer(cmd, cache):
        variant = next((v for v, flags in fresh.VARIANTS.items() if flags and flags[-1] in cmd), "auto")
        calls.append((variant, cache))
        stored = cache.name == "stored"
        tps = {"plain": 200.0, "k1": 180.0, "k3": 220.0, "auto": 215.0}[variant]
        baseline = 200.0 if variant == "plain" or stored else 200.0 / 1.2
        stats = {"tokens_per_second": tps, "baseline_tokens_per_second": baseline,
                 "speedup": round(tps / baseline, 3), "acceptance_rate": None if variant == "plain" else 0.5}
        return {"stats": stats, "token_ids": [1, 2, 3]}

    result = fresh.run_fresh("demo", max_tokens=300, repeats=2, run=answer)
    warmup, timed = calls[:8], calls[8:]
    assert [v for v, _ in warmup] == list(fresh.VARIANTS) * 2 and {c.name for _, c in warmup} == {"stored"}
    assert len(timed) == 2 * 2 * 7  # repeats x prompts x (plain, 3 variants x 2 modes)
    assert [v for v, _ in timed[:7]] == [v for v, _ in timed[14:21]][::-1]  # reversed next repeat
    fresh_caches = [c for _, c in timed if c.name != "stored"]
    assert len(set(fresh_caches)) == len(fresh_caches) == 2 * 2 * 3  # an empty folder each
    stored, none = result["goals"]["stored"], result["goals"]["none"]
    assert [stored[g]["met"] for g in ("baseline_within", "meter_within", "policy_vs_best_k", "policy_vs_plain")] == [True] * 4
    assert stored["policy_vs_best_k"]["value"] == round(215 / 220, 3)
    assert none["baseline_within"]["value"] == round(2 / 8, 3)  # plain alone, on both prompts
    assert none["meter_within"]["met"] is False and none["policy_vs_plain"]["value"] == 1.075
    assert result["prompts"]["code"]["k3/none"]["meter_vs_real"] == 1.2
    assert result["outputs_identical"] is True
    assert not [n for n in result["notes"] if n.startswith("plain decoding")]  # plain ran alike
    render.render_fresh(result, Console(file=io.StringIO(), width=80))


def test_fresh_processes_say_when_plain_decoding_moved_more_than_the_goals_allow():
    from gemma_mtp_mlx.tools.bench import fresh

    plain_speeds = iter([200.0, 150.0, 200.0, 196.0])  # prose, code; then again
    warm_up = iter(range(2 * len(fresh.VARIANTS)))

    def answer(cmd, cache):
        variant = next((v for v, flags in fresh.VARIANTS.items() if flags and flags[-1] in cmd), "auto")
        timed = next(warm_up, None) is None
        tps = next(plain_speeds) if variant == "plain" and timed else 200.0
        stats = {"tokens_per_second": tps, "baseline_tokens_per_second": tps, "speedup": 1.0,
                 "acceptance_rate": None}
        return {"stats": stats, "token_ids": [1, 2, 3]}

    notes = fresh.run_fresh("demo", max_tokens=300, repeats=2, run=answer)["notes"]
    said = [n for n in notes if n.startswith("plain decoding")]
    assert said == ["plain decoding on code ran at 150-196 tok/s across the repeats (31% apart): "
                    "this machine's noise, beyond the 10% the goals allow"]


def test_a_fresh_process_writes_its_costs_in_the_cache_folder_it_is_given(tmp_path, tmp_path_factory, monkeypatch):
    """One real `gemma-chat` process as the bench starts it: it answers in JSON, imports this
    gemma-chat, and stores what it learned in the folder given, not the user's."""
    from gemma_mtp_mlx import blas
    from gemma_mtp_mlx.tools.bench import fresh
    from tests.test_chat import build_tiny

    monkeypatch.setenv(blas.MARKER, "1")  # one process: no re-execution with OpenBLAS

    target = build_tiny(tmp_path_factory)
    cmd = fresh.command(str(target), "auto", "Hello", 24, "k1")
    answer = fresh.run_process(cmd, tmp_path / "cache")
    assert len(answer["token_ids"]) == 24 and answer["stats"]["drafted"] > 0
    (entry,) = json.loads((tmp_path / "cache" / "gemma-chat" / "costs.json").read_text())["entries"]
    assert entry["names"] == {"target": "target", "drafter": "assistant"}
