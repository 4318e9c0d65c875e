"""Gemma 4's mixture-of-experts block (26B-A4B): router and expert dispatch (spec §1.7, §5).

Routing is position-wise, so a verify block of K+1 tokens routes each token exactly as K+1
single-token decode steps would: speculative decoding cannot change which experts run. Dispatch
below only changes how the chosen experts' weights are read, never which experts or weights.

Expert weights are stored as HF ships them: `gate_up_proj` [E, 2I, H] (gate rows, then up rows)
and `down_proj` [E, H, I], so one matmul per expert yields gate and up together.

Dispatch knows how many tokens the forward carries:
- one token (decode): one gather per selected expert, unsorted — nothing to share;
- more tokens on a GPU: (token, expert) pairs sorted by expert, `sorted_indices=True`, so that
  Metal's gather kernel streams each selected expert's weights once per forward (mlx-lm sorts only
  from 64 pairs on, i.e. 8 verify tokens at top-8);
- more tokens on the CPU: MLX's CPU gather_mm ignores `sorted_indices` (one BLAS call of one row
  per pair: measured, sorting changes nothing), so the pairs are grouped on the host instead and
  every selected expert runs one BLAS call over all of its tokens (a matrix of c rows costs far
  less than c matvecs: 1.2x one row for 2 rows, 1.7x for 4, at 26B-A4B sizes with OpenBLAS).
  Groups are batched by their row count, so nothing is padded and there are at most a few calls
  per projection. Reading the routing on the host is a sync, harmless on the CPU (the same
  threads run the graph) but it would stall a GPU queue, hence the split.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort


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


class Experts(nn.Module):
    """Sum over the selected experts of weight x down(gelu(gate x) * up x)."""

    def __init__(self, args):
        super().__init__()
        hidden, width, count = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_up_proj = SwitchLinear(hidden, 2 * width, count, bias=False)
        self.down_proj = SwitchLinear(width, hidden, count, bias=False)

    def glu(self, x: mx.array, idx: mx.array, sorted_indices: bool = False) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=sorted_indices), 2, axis=-1)
        return self.down_proj(nn.gelu_approx(gate) * up, idx, sorted_indices=sorted_indices)

    def glu_one(self, x: mx.array, idx: mx.array) -> mx.array:
        """One token. On the CPU, unquantised: gate and up as two gathers over row views of the
        fused weight (no copy); one gather of 2I rows measured ~1.5 % slower per decode step
        there. Elsewhere the fused gather (one kernel reading the expert's rows)."""
        if not (on_cpu() and isinstance(self.gate_up_proj, SwitchLinear)):
            return self.glu(x, idx)
        w = self.gate_up_proj.weight.swapaxes(-1, -2)
        half = w.shape[-1] // 2
        gate = mx.gather_mm(x, w[..., :half], rhs_indices=idx)
        up = mx.gather_mm(x, w[..., half:], rhs_indices=idx)
        return self.down_proj(nn.gelu_approx(gate) * up, idx)

    def __call__(self, x: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        if experts.size == experts.shape[-1]:  # one token: a plain gather
            y = self.glu_one(mx.expand_dims(x, (-2, -3)), experts).squeeze(-2)
        else:
            y = self._grouped_on_host(x, experts) if on_cpu() else None
            if y is None:
                xs, idx, order = _gather_sort(mx.expand_dims(x, (-2, -3)), experts)
                y = _scatter_unsort(self.glu(xs, idx, sorted_indices=True), order, experts.shape)
                y = y.squeeze(-2)
        return (y * weights[..., None]).sum(axis=-2)

    def _grouped_on_host(self, x: mx.array, experts: mx.array) -> mx.array | None:
        """[..., k, H]: each selected expert applied once to all of its tokens (see the top);
        None inside mx.compile / vmap (distillation's teacher), where nothing can be read."""
        k, hidden = experts.shape[-1], x.shape[-1]
        try:
            pairs = np.array(experts).reshape(-1)  # the routing, read on the host (a sync)
        except ValueError:
            return None
        order = np.argsort(pairs, kind="stable")
        ids, starts, counts = np.unique(pairs[order], return_index=True, return_counts=True)
        rows = x.reshape(-1, hidden)
        outs, placed = [], []
        for c in np.unique(counts):  # one call per group size: no padding rows
            chosen = counts == c
            group = order[starts[chosen][:, None] + np.arange(c)]  # [n, c] pair numbers
            y = self.glu(rows[mx.array(group // k)], mx.array(ids[chosen].astype(np.uint32)))
            outs.append(y.reshape(-1, hidden))
            placed.append(group.reshape(-1))
        back = np.argsort(np.concatenate(placed))  # pair p's row in the concatenation
        return mx.concatenate(outs)[mx.array(back)].reshape(*experts.shape, hidden)


def on_cpu() -> bool:
    """MLX runs on the CPU here: group (token, expert) pairs on the host rather than by sorted
    gather (GPU), and take the one-token gate/up as two gathers."""
    return mx.default_device() == mx.cpu


# -- checkpoint layouts ------------------------------------------------------------------------
_SPLIT = {".switch_glu.gate_proj": 0, ".switch_glu.up_proj": 1}


def fused_module_path(path: str) -> str:
    """mlx-lm's expert module path -> ours (`experts.switch_glu.{gate,up}_proj` ->
    `experts.gate_up_proj`, `experts.switch_glu.down_proj` -> `experts.down_proj`)."""
    for old in (*_SPLIT, ".switch_glu.down_proj"):
        if ".experts" + old in path:
            new = ".gate_up_proj" if old in _SPLIT else ".down_proj"
            return path.replace(".experts" + old, ".experts" + new)
    return path


def sanitize_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF `experts.gate_up_proj` / `experts.down_proj` (bare tensors) and mlx-community's split
    `experts.switch_glu.{gate,up,down}_proj.{weight,scales,biases}` -> our modules. Gate and up
    are concatenated along the output rows (axis 1); affine quantisation groups run along the
    input dim, so packed weights, scales and biases concatenate the same way."""
    out, halves = {}, {}
    for key, value in weights.items():
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            out[key + ".weight"] = value
            continue
        part = next((s for s in _SPLIT if s + "." in key), None)
        if part is None:
            out[fused_module_path(key)] = value
            continue
        halves.setdefault(fused_module_path(key), [None, None])[_SPLIT[part]] = value
    for key, (gate, up) in halves.items():
        if gate is None or up is None:
            raise ValueError(f"{key}: the checkpoint has only one of gate_proj / up_proj")
        out[key] = mx.concatenate([gate, up], axis=1)
    return out
