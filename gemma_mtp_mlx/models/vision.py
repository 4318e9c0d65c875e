"""Gemma 4's vision encoder in MLX: image patches -> soft tokens (spec §7).

Patches (flattened p x p x 3 pixels in [0, 1]) are projected and given a learned 2-D position
(one table for x, one for y), run through bidirectional encoder layers with axial 2-D RoPE,
average-pooled in k x k windows of the patch grid, scaled by sqrt(hidden) and, where the config
says so, standardised. Module names follow the checkpoints (`vision_tower.*`), so weights load
by name; the math follows transformers' `modeling_gemma4.py`, the reference.

One image at a time and without padding: transformers pads every image to the budget's patch
count and masks the padding out, which gives the real patches the same values.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn


@dataclass
class VisionArgs:
    # Defaults are transformers' `Gemma4VisionConfig`'s.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> "VisionArgs":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    @property
    def rope_theta(self) -> float:
        return (self.rope_parameters or {}).get("rope_theta", 100.0)


class ClippableLinear(nn.Module):
    """A linear layer whose input and output are clamped to ranges stored in the checkpoint
    (`use_clipped_linears`)."""

    def __init__(self, args: VisionArgs, dims_in: int, dims_out: int):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = args.use_clipped_linears
        if self.clipped:
            self.input_min = mx.array(-float("inf"))
            self.input_max = mx.array(float("inf"))
            self.output_min = mx.array(-float("inf"))
            self.output_max = mx.array(float("inf"))

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def rms_norm_f32(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """transformers' Gemma4RMSNorm: computed in float32, cast back."""
    y = mx.fast.rms_norm(x.astype(mx.float32), None, eps)
    if weight is not None:
        y = y * weight.astype(mx.float32)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm_f32(x, self.weight, self.eps)


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the first half of the head dims by the patch's x, the second half by its y, each
    half as a rotate-half RoPE of its own. x: [L, heads, dims]; cos, sin: [2, L, dims / 4]."""
    half = x.shape[-1] // 2
    parts = []
    for axis in range(2):
        part = x[..., axis * half : (axis + 1) * half]
        c = mx.concatenate([cos[axis], cos[axis]], axis=-1)[:, None, :].astype(x.dtype)
        s = mx.concatenate([sin[axis], sin[axis]], axis=-1)[:, None, :].astype(x.dtype)
        a, b = part[..., : half // 2], part[..., half // 2 :]
        parts.append(part * c + mx.concatenate([-b, a], axis=-1) * s)
    return mx.concatenate(parts, axis=-1)


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        h = args.hidden_size
        self.q_proj = ClippableLinear(args, h, self.n_heads * self.head_dim)
        self.k_proj = ClippableLinear(args, h, self.n_kv_heads * self.head_dim)
        self.v_proj = ClippableLinear(args, h, self.n_kv_heads * self.head_dim)
        self.o_proj = ClippableLinear(args, self.n_heads * self.head_dim, h)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.eps = args.rms_norm_eps

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        L = x.shape[0]
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(L, self.n_heads, -1)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(L, self.n_kv_heads, -1)), cos, sin)
        v = rms_norm_f32(self.v_proj(x).reshape(L, self.n_kv_heads, -1), None, self.eps)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        # Every patch sees every patch; scale 1.0 as in the text model (q and k are normed).
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(out[0].transpose(1, 0, 2).reshape(L, -1))


class MLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = ClippableLinear(args, h, i)
        self.up_proj = ClippableLinear(args, h, i)
        self.down_proj = ClippableLinear(args, i, h)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Encoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, patches: mx.array, positions: mx.array) -> mx.array:
        # Pixels in [0, 1] become [-1, 1] here (the processor does no normalisation).
        dtype = self.position_embedding_table.dtype
        h = self.input_proj((2 * (patches - 0.5)).astype(dtype))
        table = self.position_embedding_table
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionModel(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = Encoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def rope_angles(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """cos and sin [2, L, head_dim / 4]: the same frequencies for x and for y."""
        quarter = self.args.head_dim // 4
        inv_freq = 1.0 / (self.args.rope_theta ** (mx.arange(quarter) * 2 / (2 * quarter)))
        angles = positions.T[:, :, None].astype(mx.float32) * inv_freq
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, patches: mx.array, positions: mx.array, grid: tuple[int, int]) -> mx.array:
        """Soft tokens [rows x cols / k^2, hidden] of one image: `patches` [L, 3p^2] in [0, 1],
        `positions` [L, 2] their (x, y) on the `grid` (rows, cols) of patches, row by row."""
        cos, sin = self.rope_angles(positions)
        h = self.patch_embedder(patches, positions)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        return self.pool(h, grid)

    def pool(self, h: mx.array, grid: tuple[int, int]) -> mx.array:
        """Mean over each k x k window of the grid, row by row; scaled and standardised in
        float32 (sqrt(hidden) scaling can leave float16's range), then cast back."""
        k = self.args.pooling_kernel_size
        rows, cols = grid
        dims = h.shape[-1]
        windows = h.astype(mx.float32).reshape(rows // k, k, cols // k, k, dims)
        pooled = windows.mean(axis=(1, 3)).reshape(-1, dims).astype(h.dtype)
        out = pooled.astype(mx.float32) * (dims**0.5)
        if self.args.standardize:
            out = (out - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return out.astype(h.dtype)
