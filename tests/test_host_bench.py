"""`gemma-chat bench --host`: eager against compiled on a real (tiny) pair, and the deep, narrow
pairs it builds from a real shape's whole stack."""

from gemma_mtp_mlx.models.configs import TARGETS
from gemma_mtp_mlx.tools.bench import shapes
from gemma_mtp_mlx.tools.bench.host import run_host_bench
from tests.test_bench import tiny_shape


def test_the_host_bench_compares_eager_and_compiled_on_the_same_tokens():
    pair = shapes.build(tiny_shape("e2b", 6))
    result = run_host_bench(pair, note="tiny e2b", max_tokens=12, repeats=1)
    assert result["identical"]
    assert [r["variant"] for r in result["rows"]] == ["plain", "K=1", "K=2", "K=3", "K=4"]
    for row in result["rows"]:
        # Fusion: a compiled step hands MLX fewer primitives than the eager one it replays.
        assert 0 < row["compiled_primitives"] < row["eager_primitives"]
        assert row["eager_cpu_ms"] > 0 and row["compiled_wall_ms"] > 0
    deeper = [r["compiled_primitives"] for r in result["rows"]]
    assert deeper == sorted(deeper)  # each draft adds a drafter step to a round
    assert result["traces"] >= 5 and result["trace_seconds"] > 0  # plain, K = 1..4: once each


def test_a_narrow_pair_keeps_the_whole_stack_of_its_shape():
    for name in ("e4b", "26b"):
        s = shapes.narrow(name)
        real = TARGETS[name]
        assert s.target["num_hidden_layers"] == real["num_hidden_layers"]
        assert s.target["layer_types"] == real["layer_types"]
        assert s.target.get("num_kv_shared_layers") == real.get("num_kv_shared_layers")
        assert s.target.get("num_experts") == real.get("num_experts")
        assert s.target["hidden_size"] == shapes.NARROW_TARGET["hidden_size"]
    pair = shapes.build(shapes.narrow("e2b"))  # its assistant reads this target's K/V
    assert pair.drafter.args.backbone_hidden_size == pair.target.args.hidden_size
