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
from memfit.memory.arch.parts import dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import (activation, children, dense_gated, dims, dropout_children, first, has, only,
                                     out_features, rotary_dim, rotary_relays_output, sliding_layers)

BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_DEFAULT = Arch(family="llama")


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

    def layer(self, spec):
        """The mean block: sliding-window layers may save more than full ones under SDPA."""
        a, n = _arch(spec), spec.model.n_layers
        sliding = min(a.sliding_layers, n) if self.mask_saved(spec) else 0
        full = self.block(spec, masked=False) if sliding < n else None
        if sliding == 0:
            return full
        windowed = self.block(spec, masked=True)
        if sliding == n:
            return windowed
        return {k: (sliding * windowed[k] + (n - sliding) * full[k]) // n for k in full}

    def block(self, spec, masked: bool) -> dict[str, int]:
        drop = self.residual_dropout(spec)
        return {"attention": self.attention(spec, masked) + drop, "mlp": self.mlp(spec) + drop,
                "norms": self.norms(spec)}

    def residual_dropout(self, spec) -> int:
        """The mask of a dropout on each branch's output (Phi-3), for blocks that have one."""
        if spec.model.arch is None or not spec.model.arch.hidden_dropout:
            return 0
        return parts.residual_dropout(spec)

    def mask_saved(self, spec) -> bool:
        """SDPA gets an explicit mask on a sliding-window layer when the sequence is longer than the window."""
        a = _arch(spec)
        return bool(a.sliding_window) and spec.seq > a.sliding_window and parts.attention_kernel(spec) == "flash"

    def attention(self, spec, masked: bool = False) -> int:
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        t = spec.tokens
        out = parts.matmul_inputs(t, m.hidden, 1 if a.fused_qkv else 3, d)
        if a.qk_norm:  # over each head of the projections' output (compute dtype)
            qk = a.option("qk_norm")
            out += qk.bytes(t * m.n_heads, m.head_dim, d.compute) + qk.bytes(t * m.n_kv_heads, m.head_dim, d.compute)
        return out + self.core(spec, masked)

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

    def mlp(self, spec) -> int:
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        return gated_mlp(spec.tokens, m.hidden, m.intermediate, a.act, a.fused_gate_up, d)

    def norms(self, spec) -> int:
        return 2 * parts.norm_bytes(spec)

    def head(self, spec):
        m, a, d = spec.model, _arch(spec), dtypes(spec)
        if m.arch is not None:  # (a hand-written Llama shape keeps its historical causal-LM head for any task)
            self.check_task(spec, a.model_type)
        rotary = a.rotary_dim if m.arch is not None else m.head_dim
        return parts.causal_head(spec, parts.rotary_tables(spec.seq, rotary, d))  # tables shared by all layers

    def temporaries(self, spec):
        """Gradients of the MLP's hidden activations; of q, k, v and the block input in attention, or of the
        (B, H, S, S) scores where the probabilities are stored."""
        return parts.block_temporaries(spec, gated=True)


def gated_mlp(tokens: int, hidden: int, inter: int, act, fused: bool, d: parts.Dtypes) -> int:
    """down(act(gate(x)) · up(x)): the input (per projection under autocast), what act saves, act's output
    (unless act saved it), up, and the product. Fused gate/up is one storage: act's input view keeps up too."""
    c, n = d.compute, tokens * inter
    out = parts.matmul_inputs(tokens, hidden, 1 if fused else 2, d)
    out += act.bytes(tokens, inter, c) + (0 if act.output else n * c) + n * c + n * c
    if fused and not act.input:  # up's view keeps the whole gate/up storage alive
        out += n * c
    return out


def _arch(spec) -> Arch:
    return spec.model.arch or _DEFAULT

