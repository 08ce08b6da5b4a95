"""SliceGPT (Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns").

Computational invariance: an RMSNorm whose scale is folded into the linears that read its output is
x ↦ x / ‖x‖ · √d, and that commutes with any orthogonal Q of the residual stream (‖Qᵀx‖ = ‖x‖). So the embedding,
and every linear writing to the residual (o_proj, down_proj) can be multiplied by Qᵀ on the output side and every
linear reading from it (q/k/v, gate/up, lm_head) by Q on the input side without changing the function. With Q the
eigenvectors of the residual stream's covariance on calibration text (sorted by eigenvalue), the last directions
carry the least signal: deleting them (columns of the embedding, rows of o_proj/down_proj, columns of the readers)
slices the hidden size from d to d' = (1 - sparsity) · d (for Llama rounded to a multiple of the attention heads:
transformers' `LlamaConfig` refuses a hidden size that is not).

Family conventions (`layout.py`): a fused qkv_proj / gate_up_proj (Phi-3) is one reader; biases of readers (Qwen2's
q/k/v) are untouched by an input-side rotation, biases of writers are rotated with their rows; Gemma's norm scale
1 + w is folded as a whole (w ← 0, and the sliced norm's w = √(d/d') − 1), and its embedding output, which
transformers multiplies by √hidden_size, is rescaled by √(d/d') so that √d' after slicing gives the same vectors.
Qwen3's q_norm / k_norm act inside the heads, after the readers, and keep their weights; but they read the same
`rms_norm_eps` as the residual norms, so their epsilon is scaled by d/d' with it (2·10⁻⁶ for 10⁻⁶ at 50 %, against
head features of mean square ~1: a change far below bf16 rounding, and the only one SliceGPT makes to a Qwen3 model
besides the deleted directions).

What differs from the paper, so that the result stays a plain transformers model:
- **one Q for the whole residual stream** (PCA of the normalized residual at every point it is read: each layer's
  two norms and the final norm, summed). The paper uses a Q per layer and puts Q_ℓᵀQ_ℓ₊₁ on the skip connection;
  these decoders have no module there, so a per-layer Q cannot be expressed without memfit code to load it. Q comes
  from one calibration pass of the unsliced model (the paper feeds each layer the outputs of the already sliced ones).
- the sliced RMSNorm averages over d' features instead of d: its weight becomes √(d/d') and its epsilon ε·d/d',
  which reproduces x/‖x‖·√d on the kept features exactly (at 0 % slicing the model is the original, to rounding).
- tied embeddings are untied (the head reads the final norm's folded scale, the embedding does not).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memfit.errors import ModelError
from memfit.prune.common import calibrate, decoder_layers, sync_config
from memfit.prune.layout import Layout, layout_of


def _fold_norm(norm: nn.Module, readers: list[nn.Linear], offset: float) -> None:
    """W ← W·diag(g) for every linear reading the norm's output, g = offset + w its scale; then g ← 1."""
    g = norm.weight.data.double() + offset
    for lin in readers:
        lin.weight.data = (lin.weight.data.double() * g).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)


def _readers(model, layout: Layout) -> tuple[list[tuple[nn.Module, list[nn.Linear]]], list[nn.Linear]]:
    """([(norm, the linears reading its output)], the linears writing to the residual stream)."""
    readers, writers = [], []
    for layer in decoder_layers(model):
        a, m = layout.attn_of(layer), layout.mlp_of(layer)
        readers.append((layer.input_layernorm, [getattr(a, n) for n in layout.qkv]))
        readers.append((layer.post_attention_layernorm, [getattr(m, n) for n in layout.gate_up]))
        writers += [getattr(a, layout.o), getattr(m, layout.down)]
    readers.append((model.model.norm, [model.lm_head]))
    return readers, writers


def residual_covariance(model, ids: torch.Tensor) -> torch.Tensor:
    """Σ over every norm input of the calibration tokens of x̂x̂ᵀ, x̂ = x / rms(x) (float64, d × d)."""
    d, layout = model.config.hidden_size, layout_of(model)
    cov = torch.zeros(d, d, dtype=torch.float64)

    def accumulate(module, inputs):
        x = inputs[0].detach().reshape(-1, d).double()
        x = x / x.pow(2).mean(-1, keepdim=True).add(getattr(module, layout.norm_eps)).sqrt()
        cov.add_((x.T @ x).cpu())

    calibrate(model, ids, {norm: accumulate for norm, _ in _readers(model, layout)[0]}, pre=True)
    return cov


def rotation(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q with eigenvectors of `cov` as columns, largest eigenvalue first; the eigenvalues)."""
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order]


def _rotate_in(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.data.double() @ q).to(lin.weight.dtype)
    lin.in_features = q.shape[1]


def _rotate_out(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (q.T @ lin.weight.data.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (q.T @ lin.bias.data.double()).to(lin.bias.dtype)
    lin.out_features = q.shape[1]


def sliced_dim(hidden: int, sparsity: float, heads: int = 1) -> int:
    """(1 − sparsity) · hidden, rounded to a multiple of `heads` (`LlamaConfig` requires the attention heads)."""
    return heads * max(1, round((1.0 - sparsity) * hidden / heads))


@torch.no_grad()
def slicegpt(model, ids: torch.Tensor, sparsity: float) -> dict:
    """Slice `model`'s hidden size by `sparsity` (fraction of the d residual directions deleted), in place; the
    choices made."""
    config, layout = model.config, layout_of(model)
    if not layout.rms_norm:
        raise ModelError(f"SliceGPT needs RMSNorm, and {config.model_type} uses LayerNorm, which does not commute "
                         f"with the rotation (the paper converts it in its own code); nor can a {config.model_type} "
                         f"config describe the result: its attention width is hidden_size, which SliceGPT shrinks; use "
                         f"flap or llm-pruner (MLP channels)")
    d = config.hidden_size
    d_new = sliced_dim(d, sparsity, config.num_attention_heads if layout.heads_divide_hidden else 1)
    emb = model.model.embed_tokens
    if layout.embed_scale and not math.isclose(float(emb.embed_scale), math.sqrt(d), rel_tol=1e-3):
        raise ModelError(f"{config.model_type}'s embedding scale is {float(emb.embed_scale)}, not √hidden_size; "
                         f"SliceGPT cannot keep it (please report)")
    if config.tie_word_embeddings or model.lm_head.weight is emb.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.data.clone())
        config.tie_word_embeddings = False
    norms, writers = _readers(model, layout)
    for norm, readers in norms:
        _fold_norm(norm, readers, layout.norm_offset)
    q, evals = rotation(residual_covariance(model, ids))
    q = q[:, :d_new].to(emb.weight.device)

    rescale = math.sqrt(d / d_new) if layout.embed_scale else 1.0  # transformers scales by √d' after slicing
    emb.weight.data = (emb.weight.data.double() @ q * rescale).to(emb.weight.dtype)
    emb.embedding_dim = d_new
    if layout.embed_scale:
        emb.embed_scale.fill_(math.sqrt(d_new))
        emb.scalar_embed_scale = math.sqrt(d_new)
    for _, readers in norms:
        for lin in readers:
            _rotate_in(lin, q)
    for lin in writers:
        _rotate_out(lin, q)
    eps = config.rms_norm_eps * d / d_new
    for norm, _ in norms:
        norm.weight = nn.Parameter(torch.full((d_new,), math.sqrt(d / d_new) - layout.norm_offset,
                                              dtype=norm.weight.dtype, device=norm.weight.device))
        setattr(norm, layout.norm_eps, eps)
    for layer in decoder_layers(model):  # Qwen3's head norms share the config's epsilon: as transformers reloads them
        for name in layout.head_norms:
            setattr(getattr(layout.attn_of(layer), name), layout.norm_eps, eps)
    config.rms_norm_eps = eps
    sync_config(model)
    kept = float(evals[:d_new].sum() / evals.sum())
    return {"hidden_size": [d, d_new], "variance_kept": kept}
