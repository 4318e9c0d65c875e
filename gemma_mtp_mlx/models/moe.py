"""Gemma 4's mixture-of-experts block (26B-A4B): router and expert dispatch (spec §1.7, §5).

Routing is position-wise, so a verify block of K+1 tokens routes each token exactly as K+1
single-token decode steps would: speculative decoding cannot change which experts run.

Dispatch knows how many tokens the forward carries. One token (decode): one matvec per selected
expert, unsorted. More tokens (a verify block, a batch): the (token, expert) pairs are sorted by
expert so that each selected expert's weights are streamed once per forward however many tokens
picked it — mlx-lm sorts only from 64 pairs on (8 verify tokens at top-8), which leaves the
typical 2-6 token verify reading an expert's weights once per token that uses it.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, _gather_sort, _scatter_unsort


class Router(nn.Module):
    """norm (no weight) -> x scale x hidden^-0.5 -> logits -> softmax -> top-k -> renormalise
    -> x per-expert scale. Reads the residual stream, not the pre-FF-normed input."""

    def __init__(self, args):
        super().__init__()
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self._root = args.hidden_size**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        z = mx.fast.rms_norm(x, self.scale * self._root, self.eps)
        probs = mx.softmax(self.proj(z).astype(mx.float32), axis=-1)
        top = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, top, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        weights = weights * self.per_expert_scale[top]
        return top, weights.astype(x.dtype)


class GeGLU(nn.Module):
    def __call__(self, up: mx.array, gate: mx.array) -> mx.array:
        return nn.gelu_approx(gate) * up


class Experts(nn.Module):
    """Sum over the selected experts of weight x down(gelu(gate x) * up x)."""

    def __init__(self, args):
        super().__init__()
        self.switch_glu = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.num_experts, activation=GeGLU()
        )

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        glu = self.switch_glu
        x = mx.expand_dims(x, (-2, -3))
        group = experts.size > experts.shape[-1]  # more than one token in this forward
        idx, order = experts, None
        if group:
            x, idx, order = _gather_sort(x, experts)
        up = glu.up_proj(x, idx, sorted_indices=group)
        gate = glu.gate_proj(x, idx, sorted_indices=group)
        y = glu.down_proj(glu.activation(up, gate), idx, sorted_indices=group)
        if group:
            y = _scatter_unsort(y, order, experts.shape)
        return (y.squeeze(-2) * weights[..., None]).sum(axis=-2)
