"""Phi (Phi-1/1.5/2) blocks: one LayerNorm feeds attention and the MLP in parallel; partial rotary; dropout.

Li et al. 2023, "Textbooks Are All You Need II: phi-1.5". Recognised by `input_layernorm` alone with
`self_attn.dense` and `mlp.fc1`/`fc2`. Derived from what autograd saves in transformers' implementation: the
normalized input, read by q/k/v and `fc1` (one tensor, or a cast copy each under autocast: three counted with
attention, one with the MLP); optional LayerNorms over each head's q and k (`qk_layernorm`); the kernel's tensors
(partial rotary makes q head-major, so SDPA's output is re-laid out for `dense`); what the activation saves and
its output; the residual dropout's mask after each branch. Outside: rotary cos/sin over the rotated channels, the
embedding dropout's mask, the final LayerNorm, the LM head's input and the loss.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch
from memfit.memory.arch.decoder import Decoder
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import (activation, children, dims, dropout, first, has, only, out_features,
                                     rotary_dim, rotary_relays_output)


class Phi(Decoder):
    name = "phi"

    def describe(self, config, model, block, prefix):
        attn = getattr(block, "self_attn", None)
        if not (children(block) >= {"input_layernorm", "self_attn", "mlp"} and "post_attention_layernorm"
                not in children(block) and has(attn, "q_proj", "k_proj", "v_proj", "dense")
                and has(block.mlp, "fc1", "fc2") and only(block.mlp, "fc1", "fc2", "activation_fn")
                and only(attn, "q_proj", "k_proj", "v_proj", "dense", "q_layernorm", "k_layernorm", "rotary_emb")):
            return None
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(attn, "head_dim", None) or hidden // heads
        rotary = rotary_dim(model)
        qk = getattr(attn, "q_layernorm", None)
        arch = Arch(family=self.name, norm=probe(block.input_layernorm), gated=False, parallel=True,
                    act=activation(getattr(block.mlp, "activation_fn", None), config, "hidden_act"),
                    rotary_dim=rotary, relaid_output=rotary_relays_output(attn, head_dim, rotary),
                    qk_norm=qk is not None, attn_dropout=dropout(config, "attention_dropout"),
                    hidden_dropout=dropout(config, "resid_pdrop"), embd_dropout=dropout(config, "embd_pdrop"),
                    options=(("qk_norm", probe(qk)),) if qk is not None else ())
        return arch, dims(config, out_features(block.mlp.fc1), first(config, "num_key_value_heads"), head_dim)

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        c = d.compute
        drop = parts.residual_dropout(spec)
        attention = parts.matmul_inputs(t, m.hidden, 3, d) + parts.attention_output_core(spec) + drop
        if a.qk_norm:
            qk = a.option("qk_norm")
            attention += qk.bytes(t * m.n_heads, m.head_dim, c) + qk.bytes(t * m.n_kv_heads, m.head_dim, c)
        # fc1 reads the same normalized input: nothing new in fp32, its own cast copy under autocast
        shared = parts.matmul_inputs(t, m.hidden, 4, d) - parts.matmul_inputs(t, m.hidden, 3, d)
        mlp = parts.plain_mlp(t, m.hidden, m.intermediate, a.act, d) - parts.matmul_inputs(t, m.hidden, 1, d)
        return {"attention": attention, "mlp": mlp + shared + drop, "norms": parts.norm_bytes(spec)}

