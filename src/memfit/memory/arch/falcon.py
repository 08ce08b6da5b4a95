"""Falcon blocks: one projection makes q, k, v (multi-query: one k/v head, or grouped in the new architecture),
rotary positions, attention and MLP in parallel off the normalized input.

Almazrouei et al. 2023, "The Falcon Series of Open Language Models". Recognised by
`self_attention.query_key_value`, `self_attention.dense` and `mlp.dense_h_to_4h`. Derived from what autograd
saves in transformers' implementation: the normalized input, read by the fused projection and the MLP (one
tensor, a cast copy each under autocast); Falcon always builds an explicit causal mask; multi-query k/v (one
head) go to SDPA without `enable_gqa`, which broadcasts them and takes its math path (the probabilities stored,
k and v expanded), while the new architecture expands k/v to every head itself (the fused kernel then saves its
copy of the mask); the output `dense` reads (re-laid out, except the fused kernel's when q keeps the
projection's layout: `read.rotary_relays_output`); what the activation
saves and its output; the dropout mask after the branches. Outside: rotary cos/sin, the final LayerNorm, the LM
head's input and the loss. ALiBi and sequential (non-parallel) blocks are not modelled (refused).
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch, UnsupportedArchitecture
from memfit.memory.arch.decoder import Decoder
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import (activation, children, dims, dropout, has, only, out_features, rotary_dim,
                                     rotary_relays_output)


class Falcon(Decoder):
    name = "falcon"

    def describe(self, config, model, block, prefix):
        attn = getattr(block, "self_attention", None)
        if not (has(attn, "query_key_value", "dense") and has(getattr(block, "mlp", None), "dense_h_to_4h")
                and only(attn, "query_key_value", "dense", "rotary_emb")
                and only(block.mlp, "dense_h_to_4h", "dense_4h_to_h", "act")):
            return None
        if getattr(config, "alibi", False) or not rotary_dim(model):
            raise UnsupportedArchitecture("ALiBi positions (no rotary embedding) are not modelled")
        if not getattr(config, "parallel_attn", True):
            raise UnsupportedArchitecture("sequential blocks (parallel_attn=False) are not modelled")
        norms = [n for n in ("input_layernorm", "ln_attn", "ln_mlp") if n in children(block)]
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        # the new architecture expands k and v to every query head before attention (and the cache)
        new = getattr(config, "new_decoder_architecture", False)
        kv_heads = heads if new else 1 if getattr(config, "multi_query", False) else heads
        arch = Arch(family=self.name, norm=probe(getattr(block, norms[0])), gated=False, fused_qkv=True,
                    parallel=True, act=activation(getattr(block.mlp, "act", None), config, "activation"),
                    rotary_dim=head_dim, relaid_output=rotary_relays_output(attn, head_dim, head_dim),
                    attn_dropout=dropout(config, "attention_dropout"),
                    hidden_dropout=dropout(config, "hidden_dropout"), options=(("norms", len(norms)),))
        return arch, dims(config, out_features(block.mlp.dense_h_to_4h), kv_heads)

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        c = d.compute
        attn_p, _ = parts.dropouts(spec)
        b, s = spec.batch, spec.seq
        q_dim, kv_dim = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        kernel = parts.attention_kernel(spec, heads_broadcast=m.n_kv_heads != m.n_heads)
        if kernel == "flash":  # the explicit mask's copy, in the query's dtype
            core = parts.flash_core(t, b, s, m.n_heads, q_dim, kv_dim, c) + b * s * s * c
            core += t * q_dim * c if a.relaid_output else 0
        elif kernel == "math":
            core = parts.math_core(t, b, s, m.n_heads, q_dim, attn_p, d) + t * q_dim * c
        else:  # q, k and v expanded for the batched matmuls, softmax in the residual's dtype, its cast copy
            scores = b * m.n_heads * s * s
            core = 3 * t * q_dim * c + scores * d.residual + (scores * c if c != d.residual else 0) + t * q_dim * c
        # two LayerNorms (new architecture) read the block input: the second adds only its own output
        shared_in = a.option("norms", 1) == 1
        attention = parts.matmul_inputs(t, m.hidden, 1, d) + core
        mlp = parts.plain_mlp(t, m.hidden, m.intermediate, a.act, d)
        if shared_in and not d.autocast:
            mlp -= parts.matmul_inputs(t, m.hidden, 1, d)
        norms = a.option("norms", 1) * parts.norm_bytes(spec, input_saved=False)
        if not shared_in:
            norms -= parts.norm_bytes(spec) - parts.norm_bytes(spec, input_saved=True)
        return {"attention": attention, "mlp": mlp + parts.residual_dropout(spec), "norms": norms}

