"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models").

Retraining-free. On calibration text, for each input channel j of o_proj and down_proj:
- fluctuation metric (WIFV) S_j = Var_tokens(x_j) · ‖W[:, j]‖² — a channel whose input barely moves can be replaced
  by its mean; for attention the metric is squared and averaged over a head's channels (as in the authors' code);
- adaptive structure: every layer's scores are standardized ((s − mean) / std within the layer), then heads and
  channels of all layers are ranked together, a head weighing its parameter count against a channel's, and the
  lowest-ranked units up to `sparsity` of the layers' parameters are removed;
- bias compensation: a removed channel is replaced by its calibration mean, b += W[:, removed] · mean(x_removed),
  so o_proj and down_proj gain a bias (Llama's `attention_bias` / `mlp_bias`; q/k/v and gate/up get zero biases).
  Only where the family's config can switch that bias on or always has it (`layout.Layout.bias`): Llama, OPT and
  GPT-NeoX both, Qwen3 and Gemma o_proj only, Mistral, Qwen2 and Phi-3 neither — there the removed channels are dropped uncompensated (the default
  `bias=None`), and `bias=True` is refused.

What differs from the paper, so that the result stays a plain `LlamaConfig` model: the global ranking decides how
many heads go in total (FLAP's split between attention and MLP), but every layer then loses the same number of head
groups (its own lowest-scored ones), rounded to a count `LlamaConfig` accepts (the hidden size must stay a multiple
of the query heads), and the same number of MLP channels, filling the rest of the parameter target — because one
config holds one width for all layers. The per-layer counts FLAP would have chosen are reported in
`details["adaptive_per_layer"]`. Heads are pruned by key/value group under grouped-query attention.
"""

from __future__ import annotations

import torch

from memfit.errors import ConfigError
from memfit.prune.common import (
    InputStats,
    add_output_bias,
    allocate,
    allowed_group_removals,
    calibrate,
    decoder_layers,
    group_params,
    keep_channels,
    keep_head_groups,
    sync_config,
)
from memfit.prune.layout import layout_of


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def fluctuation(stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
    """WIFV: Var(x_j) · Σ_i W_ij² per input channel j."""
    return stats.var * weight.double().pow(2).sum(0).cpu()


def _removed_mean_output(lin, stats: InputStats, removed: torch.Tensor) -> torch.Tensor:
    """W[:, removed] · mean(x_removed): what the removed input channels add to the output on average."""
    return lin.weight.double()[:, removed] @ stats.mean[removed].to(lin.weight.device)


@torch.no_grad()
def flap(model, ids: torch.Tensor, sparsity: float, bias: bool | None = None, uniform: bool = True) -> dict:
    """Prune `sparsity` of the decoder layers' linear parameters with FLAP, in place (`bias`: compensate; None:
    wherever the family's config can hold the bias); the choices made. `uniform=False` cuts each layer to the width
    the global ranking gave it, as the paper does: the model runs in memory, but no config describes it, so it
    cannot be saved (a reference for benchmarks)."""
    layers, layout = decoder_layers(model), layout_of(model)
    o, down = layout.o, layout.down
    can = {name: layout.bias_of(name) is not False for name in (o, down)}
    if bias and not all(can.values()):
        raise ConfigError(f"FLAP's bias compensation needs a bias on {o} and {down}, and a {model.config.model_type} "
                          f"config can hold one on {' and '.join(n for n in can if can[n]) or 'neither'}; "
                          f"drop bias=True")
    compensate = {name: can[name] if bias is None else bool(bias) for name in (o, down)}
    if not uniform and len(layout.qkv) == 1 and layout.prune_heads:
        raise ConfigError(f"FLAP with per-layer widths needs separate q/k/v projections; {model.config.model_type}'s "
                          f"fused qkv_proj is split by the config's head count, which is one for all layers")
    attn_stats = {l: InputStats() for l in layers}
    mlp_stats = {l: InputStats() for l in layers}
    attn, mlp = {l: layout.attn_of(l) for l in layers}, {l: layout.mlp_of(l) for l in layers}
    hooks = {getattr(attn[l], o): attn_stats[l] for l in layers} | {getattr(mlp[l], down): mlp_stats[l]
                                                                     for l in layers}
    calibrate(model, ids, hooks)

    n_q, n_kv, hd = layout.heads(attn[layers[0]])
    rep = n_q // n_kv
    hidden = getattr(attn[layers[0]], o).out_features
    n_channels = layout.channels(mlp[layers[0]])
    head_params, channel_params = group_params(hidden, rep, hd), layout.channel_params(hidden)
    group_scores, channel_scores = [], []
    for l in layers:
        s_attn = fluctuation(attn_stats[l], getattr(attn[l], o).weight) ** 2
        group_scores.append(_standardize(s_attn).reshape(n_kv, rep * hd).mean(1))
        channel_scores.append(_standardize(fluctuation(mlp_stats[l], getattr(mlp[l], down).weight)))
    g, c = torch.stack(group_scores), torch.stack(channel_scores)

    # global ranking (FLAP's AL-AM): remove from the lowest score up until `sparsity` of the parameters is gone
    scores = torch.cat([g.flatten(), c.flatten()])
    weight = torch.cat([torch.full((g.numel(),), float(head_params)), torch.full((c.numel(),), float(channel_params))])
    order = torch.argsort(scores)
    target = sparsity * len(layers) * (n_kv * head_params + n_channels * channel_params)
    removed = order[: int((torch.cumsum(weight[order], 0) <= target).sum())]
    is_head = removed < g.numel()
    adaptive_heads = torch.bincount(removed[is_head] // n_kv, minlength=len(layers))
    adaptive_channels = torch.bincount((removed[~is_head] - g.numel()) // n_channels, minlength=len(layers))
    if uniform:
        per_layer = [allocate(target, int(is_head.sum()) / len(layers),
                              allowed_group_removals(hidden, n_kv, rep, layout), len(layers), head_params,
                              channel_params, n_channels)] * len(layers)
    else:
        per_layer = [(min(int(h), n_kv - 1) if layout.prune_heads else 0, min(int(k), n_channels - 1))
                     for h, k in zip(adaptive_heads, adaptive_channels)]

    for i, l in enumerate(layers):
        heads, channels = per_layer[i]
        keep_g = torch.argsort(g[i], descending=True)[: n_kv - heads]
        keep_c = torch.argsort(c[i], descending=True)[: n_channels - channels]
        if heads:
            drop = torch.ones(n_kv, dtype=torch.bool)
            drop[keep_g] = False
            cols = drop.repeat_interleave(rep * hd)
            delta = _removed_mean_output(getattr(attn[l], o), attn_stats[l], cols)
            keep_head_groups(attn[l], layout, keep_g.tolist())
            if compensate[o]:
                setattr(attn[l], o, add_output_bias(getattr(attn[l], o), delta))
        if channels:
            drop = torch.ones(n_channels, dtype=torch.bool)
            drop[keep_c] = False
            delta = _removed_mean_output(getattr(mlp[l], down), mlp_stats[l], drop)
            keep_channels(mlp[l], layout, keep_c.tolist())
            if compensate[down]:
                setattr(mlp[l], down, add_output_bias(getattr(mlp[l], down), delta))
    if uniform:
        sync_config(model)
    return {"head_groups_removed_per_layer": per_layer[0][0] if uniform else [h for h, _ in per_layer],
            "channels_removed_per_layer": per_layer[0][1] if uniform else [k for _, k in per_layer],
            "bias_compensation": [name for name, on in compensate.items() if on],
            "adaptive_per_layer": {"head_groups": adaptive_heads.tolist(), "channels": adaptive_channels.tolist()}}
