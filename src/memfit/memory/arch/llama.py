"""Llama-like decoder blocks: x + attn(norm(x)), then + mlp(norm(x)), RMSNorm, rotary positions, gated MLP.

Recognised by their modules (`self_attn` with `o_proj`, a gated `mlp`, `input_layernorm` and
`post_attention_layernorm`), which covers Llama, Mistral (sliding window), Qwen2 (GQA), Qwen3 (q/k norms) and
Phi-3 (fused `qkv_proj` and `gate_up_proj`). Derived from what autograd saves in transformers' implementation:

- attention: the projections' input (one tensor, or one cast copy per projection under autocast), Qwen3's norm
  over each head's q and k, and the kernel's tensors (`parts.flash_core` / `math_core` / the eager softmax).
  Where SDPA gets an explicit mask — a sliding-window layer longer than its window — transformers repeats k and v
  to every query head and the CPU kernel saves its own copy of the mask in the query's dtype, per layer;
- MLP: its input (per projection under autocast), what the activation saves (`probe.py`), its output unless the
  activation saved it, up, and the product down reads. A fused gate/up output is one storage kept whole;
- two norms per block; outside: rotary cos/sin (the rotated channels), the final norm, the LM head's input and
  the loss.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch, Family
from memfit.memory.arch.flow import BlockFlow, Flow
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import (activation, children, dense_gated, dims, dropout_children, first, has, only,
                                     out_features, rotary_dim, rotary_relays_output, sliding_layers)

BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_DEFAULT = Arch(family="llama")
FULL = BlockFlow(True, frozenset(), True)
"""A block of a full fine-tune: its input needs a gradient and every weight trains."""


class Llama(Family):
    name = "llama"
    layouts = (BLOCK,)  # the sets of child modules a block of this family has

    def describe(self, config, model, block, prefix):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if children(block) not in self.layouts or not has(attn, "o_proj"):
            return None
        if not (has(attn, "q_proj", "k_proj", "v_proj") or has(attn, "qkv_proj")) or not only(
                attn, "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm", "rotary_emb"):
            return None
        norm = probe(block.input_layernorm)
        if not self.owns_norm(norm) or not self.owns_mlp(mlp):
            return None
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(attn, "head_dim", None) or first(config, "head_dim") or hidden // heads
        kv_heads = first(config, "num_key_value_heads", default=heads)
        n_layers = config.num_hidden_layers
        rotary = rotary_dim(model)
        facts = dict(
            family=self.name, norm=norm, fused_qkv=has(attn, "qkv_proj"), rotary_dim=rotary,
            relaid_output=rotary_relays_output(attn, head_dim, rotary),
            qk_norm=has(attn, "q_norm", "k_norm"), sliding_window=int(first(config, "sliding_window", default=0)),
            sliding_layers=sliding_layers(config, n_layers), attn_dropout=float(first(config, "attention_dropout",
                                                                                   default=0.0)),
            hidden_dropout=dropout_children(block),  # Phi-3's residual dropouts
            options=(("qk_norm", probe(attn.q_norm)),) if has(attn, "q_norm") else (),
        )
        for more in (self.mlp_facts(config, mlp), self.more_facts(config, block)):  # options accumulate
            facts.update(more, options=facts["options"] + more.get("options", ()))
        return Arch(**facts), dims(config, self.intermediate(config, mlp), kv_heads, head_dim)

    # --- hooks for the families built on this one (Gemma, MoE) ---

    def owns_norm(self, norm) -> bool:
        return norm.width_fp32 == 0  # Gemma's (1 + weight) norm is the Gemma family's

    def owns_mlp(self, mlp) -> bool:
        return dense_gated(mlp) and only(mlp, "gate_proj", "up_proj", "gate_up_proj", "down_proj", "act_fn",
                                         "activation_fn")

    def mlp_facts(self, config, mlp) -> dict:
        return dict(act=activation(getattr(mlp, "act_fn", None), config, "hidden_act", "hidden_activation"),
                    fused_gate_up=has(mlp, "gate_up_proj"))

    def intermediate(self, config, mlp) -> int:
        if has(mlp, "gate_up_proj"):
            return out_features(mlp.gate_up_proj) // 2
        return first(config, "intermediate_size", default=0) or out_features(mlp.up_proj)

    def more_facts(self, config, block) -> dict:
        return {}

    # --- formulas ---

    def layer(self, spec, flow: BlockFlow = FULL):
        """The mean block: sliding-window layers may save more than full ones under SDPA. `flow`: where gradients
        flow in a partly frozen model (`arch/flow.py`)."""
        a, n = _arch(spec), spec.model.n_layers
        sliding = min(a.sliding_layers, n) if self.mask_saved(spec) else 0
        full = self.block(spec, False, flow) if sliding < n else None
        if sliding == 0:
            return full
        windowed = self.block(spec, True, flow)
        if sliding == n:
            return windowed
        return {k: (sliding * windowed[k] + (n - sliding) * full[k]) // n for k in full}

    def layer_with(self, spec, flow):
        return self.layer(spec, flow)

    def block(self, spec, masked: bool, flow: BlockFlow = FULL) -> dict[str, int]:
        drop = self.residual_dropout(spec)
        attn_in, mid, mlp_in, out = self.grads(flow)
        return {"attention": self.attention(spec, masked, flow) + (drop if mid else 0),
                "mlp": self.mlp(spec, flow, mlp_in) + (drop if out else 0), "norms": self.norms(spec, flow)}

    def grads(self, flow: BlockFlow) -> tuple[bool, bool, bool, bool]:
        """Whether the attention's input, the residual after attention, the MLP's input and the block's output
        need a gradient."""
        attn_in = flow.grad_in or flow.has("input_layernorm")
        mid = attn_in or flow.has("self_attn")
        mlp_in = mid or flow.has(*self.MLP_NORMS)
        return attn_in, mid, mlp_in, mlp_in or flow.has("mlp", *self.POST_NORMS)

    MLP_NORMS: tuple[str, ...] = ("post_attention_layernorm",)  # the norm(s) between the residual and the MLP
    POST_NORMS: tuple[str, ...] = ()  # norms on a branch's output before the residual (Gemma2)

    def input_grad(self, flow: BlockFlow, path: str) -> bool:
        """Whether the module at `path` reads an input that needs a gradient (a LoRA `lora_B` reads `lora_A`'s
        output, which does whenever the adapter trains)."""
        if flow.dead:
            return False
        attn_in, mid, mlp_in, _ = self.grads(flow)
        if ".lora_B." in f"{path}.":
            return True
        if path.startswith(("self_attn.o_proj", "self_attn.dense")):
            return attn_in or flow.has("self_attn")
        if path.startswith("self_attn."):
            return attn_in
        if path.startswith(("mlp.down_proj", "mlp.shared_expert.down_proj")):
            return mlp_in or flow.has("mlp")
        return mlp_in if path.startswith("mlp.") else flow.grad_in

    def output_held(self, spec):
        """The forward's KV cache (`use_cache`): under autocast the keys leave the rotary in the residual's dtype
        (cos/sin are kept in it) while attention saves its own cast copies, so the cache's keys are extra."""
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        if not d.autocast or (m.arch is not None and not a.rotary_dim):
            return 0
        return m.n_layers * spec.tokens * m.n_kv_heads * m.head_dim * d.residual

    def cache_saved(self, spec):
        """The cache's values, and its keys unless they are the residual-dtype copies `output_held` counts."""
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        if spec.task != "causal_lm":
            return 0
        keys_extra = d.autocast and (m.arch is None or a.rotary_dim)
        return spec.tokens * m.n_kv_heads * m.head_dim * (d.compute + (0 if keys_extra else d.residual))

    def kept_inputs(self, spec):
        m, a = spec.model, _arch(spec)
        own_copy = parts.attention_kernel(spec) != "flash" or (m.arch is not None and a.relaid_output)
        return () if own_copy else ("self_attn.o_proj",)

    def residual_dropout(self, spec) -> int:
        """The mask of a dropout on each branch's output (Phi-3), for blocks that have one."""
        if spec.model.arch is None or not spec.model.arch.hidden_dropout:
            return 0
        return parts.residual_dropout(spec)

    def mask_saved(self, spec) -> bool:
        """SDPA gets an explicit mask on a sliding-window layer when the sequence is longer than the window."""
        a = _arch(spec)
        return bool(a.sliding_window) and spec.seq > a.sliding_window and parts.attention_kernel(spec) == "flash"

    def attention(self, spec, masked: bool = False, flow: BlockFlow = FULL) -> int:
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        t, c = spec.tokens, d.compute
        attn_in = self.grads(flow)[0]
        if a.fused_qkv:
            projections = int(flow.has("self_attn.qkv_proj"))
        else:
            projections = sum(flow.has(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
        out = parts.matmul_inputs(t, m.hidden, projections, d) if projections else 0
        q_grad = attn_in or flow.has("self_attn.q_proj", "self_attn.qkv_proj")
        k_grad = attn_in or flow.has("self_attn.k_proj", "self_attn.qkv_proj")
        if a.qk_norm:  # over each head of the projections' output (compute dtype)
            qk = a.option("qk_norm")
            for rows, grad, norm in ((t * m.n_heads, q_grad, "q_norm"), (t * m.n_kv_heads, k_grad, "k_norm")):
                saves = qk.when(grad, flow.has(f"self_attn.{norm}"))
                out += saves.bytes(rows, m.head_dim, c) if saves is not None else 0
        # the kernel saves q, k, v (and its output) when any of them needs a gradient; the output copy `o_proj`
        # reads (eager, SDPA's math path, a re-laid-out output) only for `o_proj`'s weight
        kernel = attn_in or flow.has("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.qkv_proj", "self_attn.q_norm", "self_attn.k_norm")
        o_trains = flow.has("self_attn.o_proj")
        copy = t * m.n_heads * m.head_dim * c
        own_copy = parts.attention_kernel(spec) != "flash" or (m.arch is not None and a.relaid_output)
        if kernel:
            return out + self.core(spec, masked) - (copy if own_copy and not o_trains else 0)
        return out + (copy if o_trains else 0)

    def core(self, spec, masked: bool = False) -> int:
        """The attention kernel's saved tensors and the output `o_proj` reads (SDPA's own unless re-laid out)."""
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        t, b, s, c = spec.tokens, spec.batch, spec.seq, d.compute
        q_dim = m.n_heads * m.head_dim
        if m.arch is None or not (masked or a.attn_softcap):
            return parts.attention_output_core(spec)
        scores = b * m.n_heads * s * s
        if parts.attention_kernel(spec) == "flash":  # masked: k, v repeated to every head; the kernel's mask copy
            return (parts.flash_core(t, b, s, m.n_heads, q_dim, q_dim, c) + b * s * s * c
                    + (t * q_dim * c if a.relaid_output else 0))
        # eager with tanh soft-capping (Gemma2): the tanh output is saved, in the scores' dtype
        attn_dropout, _ = parts.dropouts(spec)
        return 3 * t * q_dim * c + scores * c + parts.eager_probs(scores, attn_dropout, d, False) + t * q_dim * c

    def mlp(self, spec, flow: BlockFlow = FULL, grad_in: bool = True) -> int:
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        if flow.full and grad_in:
            return gated_mlp(spec.tokens, m.hidden, m.intermediate, a.act, a.fused_gate_up, d)
        return gated_mlp(spec.tokens, m.hidden, m.intermediate, a.act, a.fused_gate_up, d, grad_in=grad_in,
                         gate=flow.has("mlp.gate_proj", "mlp.gate_up_proj"),
                         up=flow.has("mlp.up_proj", "mlp.gate_up_proj"), down=flow.has("mlp.down_proj"))

    def norms(self, spec, flow: BlockFlow = FULL) -> int:
        attn_in, mid, _, _ = self.grads(flow)
        return (parts.norm_bytes(spec, grad_in=flow.grad_in, weight=flow.has("input_layernorm"))
                + parts.norm_bytes(spec, grad_in=mid, weight=flow.has("post_attention_layernorm")))

    def head(self, spec, flow: Flow | None = None):
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        if m.arch is not None:  # (a hand-written Llama shape keeps its historical causal-LM head for any task)
            self.check_task(spec, a.model_type)
        rotary = a.rotary_dim if m.arch is not None else m.head_dim
        # rotary tables shared by all layers
        return parts.causal_head(spec, parts.rotary_tables(spec.seq, rotary, d), flow)

    def head_with(self, spec, flow):
        return self.head(spec, flow)

    def temporaries(self, spec):
        """Gradients of the MLP's hidden activations; of q, k, v and the block input in attention, or of the
        (B, H, S, S) scores where the probabilities are stored."""
        return parts.block_temporaries(spec, gated=True)


def gated_mlp(tokens: int, hidden: int, inter: int, act, fused: bool, d: parts.Dtypes, grad_in: bool = True,
              gate: bool = True, up: bool = True, down: bool = True) -> int:
    """down(act(gate(x)) · up(x)): the input (per projection under autocast), what act saves, act's output
    (unless act saved it), up, and the product. Fused gate/up is one storage: act's input view keeps up too.
    Where the model is partly frozen: `grad_in` — x needs a gradient; `gate`, `up`, `down` — which projections'
    weights train (a frozen projection does not keep its input; an op whose inputs need no gradient saves
    nothing)."""
    c, n = d.compute, tokens * inter
    uses = (1 if gate or up else 0) if fused else gate + up
    out = parts.matmul_inputs(tokens, hidden, uses, d) if uses else 0
    gate_grad, up_grad = grad_in or gate, grad_in or up
    if gate_grad:  # act's own saves, and up for the product's gradient with respect to act's output
        out += act.bytes(tokens, inter, c) + n * c
        if fused and not act.input:  # up's view keeps the whole gate/up storage alive
            out += n * c
    if up_grad and not (act.output and gate_grad):  # act's output for the product's gradient w.r.t. up
        out += n * c
    return out + (n * c if down else 0)


def _arch(spec) -> Arch:
    return spec.model.arch or _DEFAULT

