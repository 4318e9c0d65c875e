"""The one table of Gemma 4 sizes: each released target's text config and its MTP assistant's,
in the hub's config.json form (spec/gemma4-mtp.md §0.1 and §0.2).

Doctor estimates memory from these (through `ModelArgs`, the loader's own reading of a config),
the benchmark builds random-weight models of these shapes, and test fixtures shrink them. A
value that turns out wrong is a one-line fix here.
"""

SLIDING = "sliding_attention"
FULL = "full_attention"
VOCAB = 262144

ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def pattern(sliding: int, repeats: int) -> list[str]:
    """`sliding` sliding-window layers then one full-attention layer, `repeats` times."""
    return ([SLIDING] * sliding + [FULL]) * repeats


def _target(**fields) -> dict:
    common = {
        "model_type": "gemma4_text",
        "head_dim": 256,
        "global_head_dim": 512,
        "vocab_size": VOCAB,
        "final_logit_softcapping": 30.0,
        "rope_parameters": ROPE,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    return common | fields


def _assistant(backbone: int, centroids: bool, **text) -> dict:
    text = {
        "num_hidden_layers": 4,
        "layer_types": [SLIDING] * 3 + [FULL],
        "head_dim": 256,
        "global_head_dim": 512,
        "vocab_size": VOCAB,
        "hidden_size_per_layer_input": 0,
        "rope_parameters": ROPE,
        "rms_norm_eps": 1e-6,
    } | text
    out = {"model_type": "gemma4_assistant", "backbone_hidden_size": backbone,
           "use_ordered_embeddings": centroids, "tie_word_embeddings": True, "text_config": text}
    if centroids:
        out |= {"num_centroids": 2048, "centroid_intermediate_top_k": 32}
    return out


TARGETS: dict[str, dict] = {
    "e2b": _target(
        hidden_size=1536, num_hidden_layers=35, layer_types=pattern(4, 7), intermediate_size=6144,
        num_attention_heads=8, num_key_value_heads=1, sliding_window=512,
        use_double_wide_mlp=True, num_kv_shared_layers=20, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=VOCAB, max_position_embeddings=131072,
    ),
    "e4b": _target(
        hidden_size=2560, num_hidden_layers=42, layer_types=pattern(5, 7), intermediate_size=10240,
        num_attention_heads=8, num_key_value_heads=2, sliding_window=512,
        num_kv_shared_layers=18, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=VOCAB, max_position_embeddings=131072,
    ),
    "26b": _target(
        hidden_size=2816, num_hidden_layers=30, layer_types=pattern(5, 5), intermediate_size=2112,
        num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
        attention_k_eq_v=True, sliding_window=1024, hidden_size_per_layer_input=0,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        max_position_embeddings=262144,
    ),
    "31b": _target(
        hidden_size=5376, num_hidden_layers=60, layer_types=pattern(5, 10), intermediate_size=21504,
        num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
        attention_k_eq_v=True, sliding_window=1024, hidden_size_per_layer_input=0,
        max_position_embeddings=262144,
    ),
}

ASSISTANTS: dict[str, dict] = {
    "e2b": _assistant(1536, True, hidden_size=256, intermediate_size=2048,
                      num_attention_heads=4, num_key_value_heads=1, sliding_window=512),
    "e4b": _assistant(2560, True, hidden_size=256, intermediate_size=2048,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=512),
    "26b": _assistant(2816, False, hidden_size=1024, intermediate_size=8192,
                      num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2,
                      attention_k_eq_v=True, sliding_window=1024),
    "31b": _assistant(5376, False, hidden_size=1024, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=16, num_global_key_value_heads=4,
                      attention_k_eq_v=True, sliding_window=1024),
}
