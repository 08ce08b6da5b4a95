"""GPT-2 blocks: pre-LayerNorm, one `Conv1D` making q, k and v, learned absolute positions, dropout in three places.

Radford et al. 2019. Recognised by `ln_1`, `attn.c_attn`, `ln_2`, `mlp.c_fc`. Derived from what autograd saves in
transformers' implementation: the fused projection's input; the kernel's tensors (with attention dropout, SDPA on
CPU takes its math path; eager casts the fp32 softmax to the value's dtype before dropout; without dropout the
fused kernel keeps k as a view of the whole q/k/v output, and copies of q and v) and the output `c_proj` reads
(re-laid out, except the fused kernel's own); the residual dropout's mask; LayerNorm, `c_fc`'s input, what the
activation saves (GPT-2's `gelu_new` is written in Python: four tensors, six in its backward), `c_proj`'s input and
the MLP dropout's mask. Outside: the input and position ids, the embedding dropout's mask, the final LayerNorm, the
LM head's input and the loss. The config's `resid_pdrop` is the hidden dropout, `attn_pdrop` the attention's,
`embd_pdrop` the embeddings'.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch, UnsupportedArchitecture
from memfit.memory.arch.decoder import Decoder
from memfit.memory.arch.parts import I64, dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import activation, children, dims, dropout, has, only, out_features


class GPT2(Decoder):
    name = "gpt2"

    def describe(self, config, model, block, prefix):
        if not ({"ln_1", "attn", "ln_2", "mlp"} <= children(block) and has(block.attn, "c_attn", "c_proj")
                and only(block.attn, "c_attn", "c_proj") and has(block.mlp, "c_fc", "c_proj")
                and only(block.mlp, "c_fc", "c_proj", "act")):
            return None
        if out_features(block.attn.c_attn) != 3 * config.hidden_size:
            raise UnsupportedArchitecture("a fused projection narrower than q, k and v of the hidden size "
                                          "(multi-query, as GPTBigCode) is not modelled")
        if hasattr(block, "crossattention") or getattr(config, "reorder_and_upcast_attn", False):
            raise UnsupportedArchitecture("GPT-2 with cross-attention or reorder_and_upcast_attn is not modelled")
        arch = Arch(family=self.name, norm=probe(block.ln_1), act=activation(block.mlp.act, config), gated=False,
                    fused_qkv=True, rotary_dim=0, attn_dropout=dropout(config, "attn_pdrop"),
                    hidden_dropout=dropout(config, "resid_pdrop"), embd_dropout=dropout(config, "embd_pdrop"))
        return arch, dims(config, out_features(block.mlp.c_fc))

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        c = d.compute
        attn_p, _ = parts.dropouts(spec)
        drop = parts.residual_dropout(spec)
        b, s = spec.batch, spec.seq
        q_dim = m.n_heads * m.head_dim
        kernel = parts.attention_kernel(spec)
        if kernel == "flash":  # k is kept as a view of the fused output (its whole storage); q, v as copies
            core = parts.flash_core(t, b, s, m.n_heads, q_dim, q_dim, c) + 2 * t * q_dim * c
        elif kernel == "math":
            core = parts.math_core(t, b, s, m.n_heads, q_dim, attn_p, d) + t * q_dim * c
        else:  # q, k, v copies for the batched matmuls, softmax (cast before dropout), re-laid-out output
            core = 4 * t * q_dim * c + parts.eager_probs(b * m.n_heads * s * s, attn_p, d, True)
        attention = parts.matmul_inputs(t, m.hidden, 1, d) + core + drop
        mlp = parts.plain_mlp(t, m.hidden, m.intermediate, a.act, d) + drop
        return {"attention": attention, "mlp": mlp, "norms": 2 * parts.norm_bytes(spec)}

    def embeddings(self, spec):
        # input ids (viewed inside the model, so counted with the step), position ids, the embedding dropout's mask
        return (spec.tokens + spec.seq) * I64 + super().embeddings(spec)

    def temporaries(self, spec):
        return parts.block_temporaries(spec, False, spec.tokens * spec.model.hidden * dtypes(spec).compute)
