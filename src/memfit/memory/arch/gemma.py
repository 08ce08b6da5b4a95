"""Gemma and Gemma2 blocks: Llama's layout with Gemma's RMSNorm, embeddings scaled by √hidden, and Gemma2's extras.

Gemma's RMSNorm computes in fp32 and multiplies by `1 + weight`: it saves the fp32 input, the per-row rsqrt, the
fp32 `1 + weight` and the fp32 normalized input (read by `probe.py`; its per-channel tensor is how this family is
recognised). Gemma2 (Team Gemma 2024, "Gemma 2: Improving Open Language Models at a Practical Size") adds a norm
after attention and around the MLP (four per block; the two after a branch read its compute-dtype output),
tanh soft-capping of attention scores (eager only: the tanh output is saved, B·H·S² in the scores' dtype) and of
the logits (B·S·V in the compute dtype, before the loss's fp32 copy), and alternating sliding-window layers.
(The √hidden normalizer is a scalar made by `torch.tensor`, which the meter does not see.)
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import UnsupportedArchitecture
from memfit.memory.arch.llama import BLOCK, FULL, Llama, _arch
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.read import first

_GEMMA2 = BLOCK | {"pre_feedforward_layernorm", "post_feedforward_layernorm"}


class Gemma(Llama):
    name = "gemma"
    layouts = (BLOCK, _GEMMA2)

    def describe(self, config, model, block, prefix):
        found = super().describe(config, model, block, prefix)
        if found is not None and found[0].qk_norm:
            raise UnsupportedArchitecture("Gemma blocks with q/k norms (Gemma3) are not modelled yet")
        return found

    def owns_norm(self, norm) -> bool:
        return norm.width_fp32 > 0

    def more_facts(self, config, block) -> dict:
        return dict(attn_softcap=float(first(config, "attn_logit_softcapping", default=0.0) or 0.0),
                    final_softcap=float(first(config, "final_logit_softcapping", default=0.0) or 0.0),
                    options=(("post_norms", hasattr(block, "post_feedforward_layernorm")),))

    MLP_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm")
    POST_NORMS = ("post_feedforward_layernorm",)

    def norms(self, spec, flow=FULL) -> int:
        if not _arch(spec).option("post_norms"):
            return super().norms(spec, flow)
        c = dtypes(spec).compute
        attn_in, _, mlp_in, _ = self.grads(flow)
        attn_out = attn_in or flow.has("self_attn")
        residual = attn_out or flow.has("post_attention_layernorm")
        mlp_out = mlp_in or flow.has("mlp")
        # input and pre-MLP norms read the residual; the two after a branch read its output (compute dtype)
        return (parts.norm_bytes(spec, grad_in=flow.grad_in, weight=flow.has("input_layernorm"))
                + parts.norm_bytes(spec, input_bytes=c, grad_in=attn_out, weight=flow.has("post_attention_layernorm"))
                + parts.norm_bytes(spec, grad_in=residual, weight=flow.has("pre_feedforward_layernorm"))
                + parts.norm_bytes(spec, input_bytes=c, grad_in=mlp_out,
                                   weight=flow.has("post_feedforward_layernorm")))

    def head(self, spec, flow=None):
        out = super().head(spec, flow)
        d, a = dtypes(spec), _arch(spec)
        if a.final_softcap:
            out["loss"] += spec.tokens * spec.model.vocab * d.compute  # tanh output
        return out
