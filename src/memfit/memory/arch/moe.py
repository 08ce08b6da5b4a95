"""Mixture-of-experts decoders (Mixtral, Qwen-MoE): Llama's attention and norms, a routed MLP.

Jiang et al. 2024, "Mixtral of Experts"; Qwen Team 2024, "Qwen1.5-MoE". Every expert's weights are held (they are
parameters: counted with the others); activations are those of the routed tokens. Derived from what autograd saves
in transformers' `grouped_mm` experts (`integrations/moe.py`), T = tokens · top-k routed rows:

- router: its input, and per token what the router saves (fp32 probabilities over the experts, top-k indices and
  weights, Mixtral's renormalization) — read by `probe.bytes_per_row`;
- experts: three int64 permutations of the T rows, the offsets (int32, one per expert), the gathered input, the
  gate/up output (one storage), what the activation saves, its output, the product, the routing weights and the
  down output (T rows each). The grouped matmul is not an autocast op on CPU, so these stay in the residual's
  dtype under autocast (on CUDA this is not measured);
- Qwen-MoE's shared expert: a gated MLP on every token, its sigmoid gate and output.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import UnsupportedArchitecture
from memfit.memory.arch.llama import FULL, Llama, _arch, gated_mlp
from memfit.memory.arch.parts import F32, I64, dtypes
from memfit.memory.arch.probe import bytes_per_row
from memfit.memory.arch.read import activation, dense_gated, first, has, out_features

MODELLED_EXPERTS = ("grouped_mm",)


class MoE(Llama):
    name = "moe"

    def owns_mlp(self, mlp) -> bool:
        return has(mlp, "experts", "gate")

    def describe(self, config, model, block, prefix):
        found = super().describe(config, model, block, prefix)
        if found is None:
            return None
        impl = getattr(config, "_experts_implementation", None) or "grouped_mm"
        if impl not in MODELLED_EXPERTS:
            raise UnsupportedArchitecture(f"experts implementation '{impl}' is "
                                          f"not modelled (memfit models {', '.join(MODELLED_EXPERTS)})")
        blocks = dict(model.named_modules())[prefix]
        if any(not self.owns_mlp(getattr(b, "mlp", None)) for b in blocks):
            raise UnsupportedArchitecture("dense and MoE blocks mixed (mlp_only_layers / decoder_sparse_step) are "
                                          "not modelled")
        return found

    def mlp_facts(self, config, mlp) -> dict:
        experts = mlp.experts
        if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
            raise UnsupportedArchitecture("only gated experts without a post-expert norm are modelled")
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None and not dense_gated(shared):
            raise UnsupportedArchitecture(f"shared expert {type(shared).__name__} is not a gated MLP")
        return dict(
            act=activation(getattr(experts, "act_fn", None), config, "hidden_act"),
            experts=experts.num_experts, top_k=mlp.gate.top_k,
            shared_expert=out_features(shared.up_proj) if shared is not None else 0,
            options=(("router_bytes", bytes_per_row(mlp.gate, config.hidden_size)),
                     ("shared_gate", has(mlp, "shared_expert_gate"))),
        )

    def intermediate(self, config, mlp) -> int:
        return mlp.experts.intermediate_dim or first(config, "moe_intermediate_size", "intermediate_size")

    def mlp(self, spec, flow=FULL, grad_in: bool = True) -> int:
        """Routed experts (and a shared one). Where the model is partly frozen: nothing when neither the input
        needs a gradient nor a weight here trains, else (an upper bound) what a trained MoE MLP saves."""
        if not (grad_in or flow.has("mlp")):
            return 0
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        t, r, c = spec.tokens, d.residual, d.compute
        rows, inter, hidden = t * a.top_k, m.intermediate, m.hidden
        shared_gate = bool(a.option("shared_gate"))
        uses = 1 + (2 if a.shared_expert else 0) + (1 if shared_gate else 0)  # router, shared gate/up, its gate
        out = parts.matmul_inputs(t, hidden, uses, d) + t * a.option("router_bytes", 0)
        # routed rows: permutations, offsets, gathered input, gate/up, act, product, weights, down output
        out += 3 * rows * I64 + a.experts * 4 + rows * hidden * r
        out += rows * 2 * inter * r + a.act.bytes(rows, inter, r) - (rows * inter * r if a.act.input else 0)
        out += (0 if a.act.output else rows * inter * r) + rows * inter * r + rows * F32 + rows * hidden * r
        if a.shared_expert:  # a gated MLP on every token (its input counted above), its output for the gate
            out += gated_mlp(t, hidden, a.shared_expert, a.act, False, d) - parts.matmul_inputs(t, hidden, 2, d)
            out += t * hidden * c + (t * c if shared_gate else 0)  # output, sigmoid
        return out

    def temporaries(self, spec):
        """Besides a dense block's: the experts' backward, where a grouped matmul makes the gradient of a whole
        stacked expert weight (all experts) while the routed rows' gradients (gate/up, input) and the routing
        weights' are alive."""
        mlp, attn = super().temporaries(spec)
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        rows, r = spec.tokens * a.top_k, d.residual
        stacked = max((p.nbytes for p in m.trainable if len(p.shape) == 3), default=0)
        routed = (stacked + rows * (2 * m.intermediate + m.hidden) * r + spec.tokens * m.hidden * r + rows * F32
                  + parts.tied_head_gradient(spec))
        return max(mlp, routed), attn
