"""LLM-Pruner (Ma et al. 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models").

Dependency groups: weights that must go together for the model to stay well formed. In a decoder layer they are
- a head group: the q_proj rows of a key/value head's query heads, its k_proj and v_proj rows, and the o_proj
  columns reading those query heads (one attention head under multi-head attention);
- an MLP channel: row j of gate_proj and up_proj and column j of down_proj.
Importance is first-order Taylor (the paper's element-wise estimate, summed over the group):
I(group) = Σ_{w in group} |w · ∂L/∂w|, L the language-model loss summed over the calibration windows; each term
estimates, to first order, how much the loss changes when that weight is zeroed. Each layer keeps its
highest-scored groups.

Uniform over layers: every layer loses `sparsity` of its head groups and MLP channels, because one `LlamaConfig`
holds one width for all layers (the paper also prunes uniformly, but skips the first and last layers, which a
single config cannot express). OPT and GPT-NeoX lose MLP channels only (their configs derive head_dim from
hidden / heads, so no config describes fewer heads). The head count is rounded to one `LlamaConfig` accepts (the hidden size must stay a
multiple of the query heads); MLP channels then make up the parameter count `sparsity` asks for. The paper's
optional LoRA recovery training is not run here.
"""

from __future__ import annotations

import torch

from memfit.prune.common import (
    allocate,
    allowed_group_removals,
    batches,
    decoder_layers,
    group_params,
    keep_channels,
    keep_head_groups,
    sync_config,
)
from memfit.prune.layout import Layout, layout_of


def accumulate_gradients(model, ids: torch.Tensor, batch_size: int = 8) -> None:
    """Fill `.grad` of the decoder layers' linears with ∂(Σ_windows loss)/∂w; every other parameter is frozen."""
    was = {p: p.requires_grad for p in model.parameters()}
    layout = layout_of(model)
    linears = [getattr(module, n) for l in decoder_layers(model) for module, n in layout.linears(l)]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for lin in linears:
        for p in lin.parameters():
            p.requires_grad_(True)
    device = next(model.parameters()).device
    try:
        for batch in batches(ids, batch_size):
            batch = batch.to(device)
            out = model(input_ids=batch, use_cache=False)
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum") / (batch.shape[1] - 1)
            loss.backward()
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    if any(lin.weight.grad is None for lin in linears):
        from memfit.compat import fail

        raise fail("no gradient reached a decoder linear", "every layer's linears in the loss's graph")


def _taylor(lin) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = (lin.weight.data * lin.weight.grad).abs().double()
    b = (lin.bias.data * lin.bias.grad).abs().double() if lin.bias is not None else None
    return w, b


def _group_sum(lin, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Σ |w·g| over the rows (dim 0, with their biases) or columns (dim 1) `idx` of one linear."""
    w, b = _taylor(lin)
    total = w.index_select(dim, idx.to(w.device)).sum()
    if b is not None and dim == 0:
        total = total + b[idx.to(b.device)].sum()
    return total.cpu()


def group_importance(layer, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ |w·g| per head group, Σ |w·g| per MLP channel) of one decoder layer, from the stored gradients."""
    attn, mlp = layout.attn_of(layer), layout.mlp_of(layer)
    n_kv = layout.heads(attn)[1]
    heads = torch.zeros(n_kv, dtype=torch.float64)
    for gi in range(n_kv if layout.prune_heads else 0):  # (GPT-NeoX interleaves its fused qkv per head)
        for name, (dim, idx) in layout.group_index(attn, [gi]).items():
            heads[gi] += _group_sum(getattr(attn, name), dim, idx)
    n = layout.channels(mlp)
    channels = torch.zeros(n, dtype=torch.float64)
    for name, (dim, idx) in layout.channel_index(mlp, torch.arange(n)).items():
        w, b = _taylor(getattr(mlp, name))
        per_index = w.sum(1 - dim) + (b if b is not None and dim == 0 else 0)
        channels += per_index[idx.to(per_index.device)].reshape(-1, n).sum(0).cpu()  # both halves of a fused gate_up
    return heads, channels


def llm_pruner(model, ids: torch.Tensor, sparsity: float) -> dict:
    """Remove `sparsity` of every layer's head groups and MLP channels by Taylor importance, in place; the choices
    made."""
    layers, layout = decoder_layers(model), layout_of(model)
    n_q, n_kv, hd = layout.heads(layout.attn_of(layers[0]))
    rep = n_q // n_kv
    hidden = getattr(layout.attn_of(layers[0]), layout.o).out_features
    n_channels = layout.channels(layout.mlp_of(layers[0]))
    head_params, channel_params = group_params(hidden, rep, hd), layout.channel_params(hidden)
    target = sparsity * len(layers) * (n_kv * head_params + channel_params * n_channels)
    heads, channels = allocate(target, sparsity * n_kv, allowed_group_removals(hidden, n_kv, rep, layout),
                               len(layers), head_params, channel_params, n_channels)
    if heads or channels:
        accumulate_gradients(model, ids)
    with torch.no_grad():
        for layer in layers:
            if not (heads or channels):
                break
            h, c = group_importance(layer, layout)
            if heads:
                keep_head_groups(layout.attn_of(layer), layout,
                                 torch.argsort(h, descending=True)[: n_kv - heads].tolist())
            if channels:
                keep_channels(layout.mlp_of(layer), layout,
                              torch.argsort(c, descending=True)[: n_channels - channels].tolist())
    for p in model.parameters():
        p.grad = None
    sync_config(model)
    return {"head_groups_removed_per_layer": heads, "channels_removed_per_layer": channels}
