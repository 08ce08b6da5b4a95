"""OPT blocks: pre-LayerNorm decoder with separate q/k/v projections, learned positions, ReLU MLP, dropout.

Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models". Recognised by `self_attn_layer_norm`,
`self_attn.out_proj`, `fc1`, `fc2`, `final_layer_norm`. Derived from what autograd saves in transformers'
implementation: the projections' input (one tensor, or a cast copy each), the kernel's tensors (SDPA's output is
what `out_proj` reads), the dropout mask after attention (`dropout`), LayerNorm, `fc1`'s input, what the
activation saves (ReLU keeps only its output, which `fc2` reads) and the dropout mask after the MLP. Outside:
the position ids computed from the attention mask (int64 per token), the final LayerNorm, the LM head's input
and the loss. OPT-350m's post-norm blocks and embedding projection are not modelled (refused).
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch, UnsupportedArchitecture
from memfit.memory.arch.decoder import Decoder
from memfit.memory.arch.parts import I64, dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import activation, children, dims, dropout, first, has, out_features


class OPT(Decoder):
    name = "opt"

    def describe(self, config, model, block, prefix):
        if not ({"self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"} <= children(block)
                and has(block.self_attn, "q_proj", "k_proj", "v_proj", "out_proj")):
            return None
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedArchitecture("post-norm blocks (do_layer_norm_before=False, OPT-350m) are not modelled")
        if first(config, "word_embed_proj_dim", default=config.hidden_size) != config.hidden_size:
            raise UnsupportedArchitecture("an embedding projection (word_embed_proj_dim != hidden_size) is not "
                                          "modelled")
        arch = Arch(family=self.name, norm=probe(block.self_attn_layer_norm), gated=False, rotary_dim=0,
                    act=activation(getattr(block, "activation_fn", None), config, "activation_function"),
                    attn_dropout=dropout(config, "attention_dropout"), hidden_dropout=dropout(config, "dropout"))
        return arch, dims(config, out_features(block.fc1))

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        drop = parts.residual_dropout(spec)
        attention = parts.matmul_inputs(t, m.hidden, 3, d) + parts.attention_core_bytes(spec) + drop
        mlp = parts.plain_mlp(t, m.hidden, m.intermediate, a.act, d) + drop
        return {"attention": attention, "mlp": mlp, "norms": 2 * parts.norm_bytes(spec)}

    def embeddings(self, spec):
        # input ids (viewed inside the model, so counted with the step), position ids from the mask's cumsum
        return 2 * spec.tokens * I64
