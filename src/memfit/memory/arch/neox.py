"""GPT-NeoX blocks: one projection makes q, k, v; partial rotary; attention and MLP in parallel off the input.

Black et al. 2022, "GPT-NeoX-20B"; also Pythia. Recognised by `attention.query_key_value`, `attention.dense`,
`mlp.dense_h_to_4h`, `input_layernorm` and `post_attention_layernorm`. Derived from what autograd saves in
transformers' implementation: the fused projection's input; the kernel's tensors (partial rotary concatenates, so
SDPA's output is re-laid out into a new tensor for `dense`: `read.rotary_relays_output`); with
`use_parallel_residual` both norms read the block input (saved once: the second norm adds only its statistics),
otherwise the second reads the sum after attention; `dense_h_to_4h`'s input, what the activation saves, its
output; dropout masks where `hidden_dropout` / `attention_dropout` are set. Outside: rotary cos/sin over the
rotated channels (`rotary_pct`), the embedding dropout's mask, the final LayerNorm, `embed_out`'s input, the loss.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch
from memfit.memory.arch.decoder import Decoder
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import (activation, children, dims, dropout, has, only, out_features, rotary_dim,
                                     rotary_relays_output)


class NeoX(Decoder):
    name = "neox"

    def describe(self, config, model, block, prefix):
        if not ({"input_layernorm", "post_attention_layernorm", "attention", "mlp"} <= children(block)
                and has(block.attention, "query_key_value", "dense") and has(block.mlp, "dense_h_to_4h")
                and only(block.attention, "query_key_value", "dense", "rotary_emb")
                and only(block.mlp, "dense_h_to_4h", "dense_4h_to_h", "act")):
            return None
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // heads
        rotary = rotary_dim(model)
        arch = Arch(family=self.name, norm=probe(block.input_layernorm), gated=False, fused_qkv=True,
                    relaid_output=rotary_relays_output(block.attention, head_dim, rotary),
                    act=activation(getattr(block.mlp, "act", None), config, "hidden_act"),
                    parallel=bool(getattr(config, "use_parallel_residual", True)), rotary_dim=rotary,
                    attn_dropout=dropout(config, "attention_dropout"), hidden_dropout=dropout(config, "hidden_dropout"),
                    embd_dropout=dropout(config, "hidden_dropout"))
        return arch, dims(config, out_features(block.mlp.dense_h_to_4h))

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        drop = parts.residual_dropout(spec)
        attention = parts.matmul_inputs(t, m.hidden, 1, d) + parts.attention_output_core(spec) + drop
        mlp = parts.plain_mlp(t, m.hidden, m.intermediate, a.act, d) + drop
        norms = parts.norm_bytes(spec) + parts.norm_bytes(spec, input_saved=a.parallel)
        return {"attention": attention, "mlp": mlp, "norms": norms}

