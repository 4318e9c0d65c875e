"""The benchmark's quick path on tiny checkpoints: every reported field is there and every run
reproduces plain decoding. No timing is asserted (speed goals live in the benchmark, not here)."""

import json

from gemma_mtp_mlx import bench

FIELDS = (
    "plain_tokens_per_second",
    "mtp_tokens_per_second",
    "speedup",
    "acceptance_rate",
    "outputs_identical",
    "mlx_lm_plain_tokens_per_second",
    "peers",
    "machine",
    "acceptance_by_position",
    "tokens_per_target_forward",
    "peak_memory_bytes",
    "never_hit",
    "k_sweep",
    "workloads",
    "cost_curves",
    "goals",
)


def test_quick_bench_reports_every_field_with_identical_outputs(echo_pairs):
    pair = echo_pairs[("dense", False)]
    result = bench.run_bench(
        pair, max_tokens=16, repeats=1, quick=True, ks=(1, 3), shapes=(), cost_reps=1
    )
    json.dumps(result)  # JSON-ready as is
    for key in FIELDS:
        assert key in result, key
    assert result["outputs_identical"] is True
    assert result["peers"]["mlx_lm"]["outputs_identical"] is True
    assert "mlx_vlm" in result["peers"]
    assert set(result["workloads"]) == {"prose", "code", "structured", "long"}
    long = result["workloads"]["long"]
    assert long["prompt_tokens"] > pair.target.args.sliding_window
    for w in result["workloads"].values():
        assert w["outputs_identical"]
        assert w["plain"]["generated_tokens"] == w["mtp"]["generated_tokens"] == 16
        assert w["mlx_lm"]["identical_to_plain"]
        assert w["plain"]["best_vs_plain"] == 1.0 and w["mtp"]["best_tokens_per_second"] > 0
    assert set(result["k_sweep"]) == {"1", "3"}
    assert not result["never_hit"]["acceptance_rate"]  # 0, or None when it parked before drafting
    # The echo drafter agrees whenever the target repeats (fixed K always drafts; the policy may
    # park on this CPU, so its own acceptance depends on timing).
    assert result["k_sweep"]["1"]["acceptance_rate"] > 0
    assert {"plain", "mtp", "mlx_lm"} <= set(result["peak_memory_bytes"])
    assert isinstance(result["machine"]["openblas_preload"], bool)
    assert result["weights_bytes"]["drafter"] > 0


def test_cost_curve_has_nine_ratios_relative_to_one_token(echo_pairs):
    pair = echo_pairs[("e2b", True)]
    curve = bench.cost_curve(pair.target, pair.drafter, context=16, reps=1)
    assert len(curve["ratios"]) == 9
    assert curve["ratios"][0] == 1.0
    assert all(r > 0 for r in curve["ratios"])
    assert curve["drafter_step_ratio"]["dense_head"] > 0
    assert curve["drafter_step_ratio"]["centroid_head"] > 0


def test_mlx_lm_twin_decodes_like_ours(pairs):
    """mlx-lm's own model class, holding our weights, gives the same greedy tokens (MoE,
    k_eq_v and per-layer-embedding shapes alike)."""
    for shape in ("e2b", "moe", "dense"):
        pair = pairs[(shape, False)]
        twin = bench.mlx_lm_twin(pair.target)
        prompt = [2, 40, 77, 301, 12]
        ours = bench.run_ours(pair, prompt, 30, mtp=False).tokens
        theirs = bench.run_mlx_lm(twin, pair.tokenizer, prompt, 30).tokens
        assert theirs == ours, shape


def test_command_line_quick_json(ckpt, capsys):
    """`main` end to end through `load`, with a random (never agreeing) drafter."""
    result = bench.main(
        str(ckpt["dense"]), str(ckpt["dense-assistant"]), max_tokens=8, quick=True,
        as_json=True, shapes=False,
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["outputs_identical"] is True
    assert printed["speedup"] == result["speedup"]


def test_moe_curve_on_tiny_dims():
    """`bench --moe-curve` with the dims shrunk: ours and mlx-lm's model on the same weights."""
    config = bench.moe_config(
        2, hidden_size=64, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        intermediate_size=64, vocab_size=512, num_attention_heads=2, num_key_value_heads=1,
        num_global_key_value_heads=1, head_dim=32, global_head_dim=64, sliding_window=64,
    )
    result = bench.moe_curve(config, context=16, reps=1)
    json.dumps(result)
    assert result["tokens"] == list(range(1, 10))
    for key in ("ours_ms", "mlx_lm_ms"):
        assert len(result[key]) == 9
        assert all(ms > 0 for ms in result[key])
    assert set(result["ratio_8_over_1"]) == {"ours", "mlx_lm"}
    assert result["layers"] == 2
