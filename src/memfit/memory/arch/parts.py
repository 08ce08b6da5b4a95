"""Formulas every block family composes: bytes per element, dropout, norms, projections' saved inputs, the
attention kernels' saved tensors and the causal-LM loss head.

Notation as in `docs/architecture.md` ("Memory model"): t = B·S tokens, c bytes of the compute dtype, r of the
residual stream (the parameter dtype: autocast does not lower it), a dropout mask m bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass

from memfit.memory.arch.base import LAYER_NORM, RMS_NORM, Saves

F32 = 4
I64 = 8
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
"""Bytes per element of each dtype name a `RunSpec` uses."""


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors a forward saves, for one run.

    `compute`: outputs of matmuls (the autocast dtype, else the parameter dtype); `residual`: the residual
    stream and norm inputs (the parameter dtype: autocast does not lower it); `autocast`: whether inputs and
    weights are cast per op (each cast copy a matmul uses is saved); `device`: "cpu" or "cuda".
    """

    compute: int
    residual: int
    autocast: bool
    device: str

    def mask(self, input_bytes: int) -> int:
        """A dropout mask: input's dtype on CPU (`input * noise`), 1-byte bool on CUDA (`native_dropout`)."""
        return 1 if self.device == "cuda" else input_bytes


def dtypes(spec: RunSpec) -> Dtypes:
    compute = DTYPE_BYTES[spec.compute_dtype]
    residual = DTYPE_BYTES.get(spec.param_dtype, F32)
    if spec.param_dtype in ("int8",):  # quantized base weights dequantize to the compute dtype
        residual = compute
    autocast = spec.compute_dtype != spec.param_dtype and compute < residual
    device = str(spec.extra.get("device", "cpu")).split(":")[0]
    return Dtypes(compute=compute, residual=residual, autocast=autocast, device=device)


def dropouts(spec: RunSpec) -> tuple[float, float]:
    """(attention, hidden) dropout probabilities: the run's (`spec.extra`), else the config's, else the family's
    default (BERT 0.1, others 0)."""
    arch = spec.model.arch
    if arch is not None:
        attn, hidden = arch.attn_dropout, arch.hidden_dropout
    else:
        attn = hidden = 0.1 if spec.model.family == "bert" else 0.0
    return float(spec.extra.get("attn_dropout", attn)), float(spec.extra.get("hidden_dropout", hidden))


def embedding_dropout(spec: RunSpec) -> float:
    """The dropout after the embeddings: the run's hidden dropout when set, else the config's."""
    arch = spec.model.arch
    default = arch.embd_dropout if arch is not None else dropouts(spec)[1]
    return float(spec.extra.get("hidden_dropout", default))


def dropout_mask(elements: int, p: float, input_bytes: int, d: Dtypes) -> int:
    """The mask a dropout with probability `p` saves for `elements` inputs (0 when off)."""
    return elements * d.mask(input_bytes) if p > 0 else 0


def matmul_inputs(tokens: int, hidden: int, uses: int, d: Dtypes) -> int:
    """Input saved by `uses` projections of one tensor: one shared tensor, or one cast copy per use."""
    return tokens * hidden * (uses * d.compute if d.autocast else d.residual)


def norm_saves(spec: RunSpec) -> Saves:
    """What the family's block norm saves (probed from the model; Llama's RMSNorm / LayerNorm by default)."""
    arch = spec.model.arch
    if arch is not None:
        return arch.norm
    return LAYER_NORM if spec.model.family == "bert" else RMS_NORM


def norm_bytes(spec: RunSpec, tokens: int | None = None, input_bytes: int | None = None,
               input_saved: bool = False, grad_in: bool = True, weight: bool = True) -> int:
    """One block norm over `tokens` rows of the hidden size, its input in `input_bytes` (the residual's);
    `grad_in` / `weight`: whether its input needs a gradient and its weight trains (`Saves.when`)."""
    t = spec.tokens if tokens is None else tokens
    r = dtypes(spec).residual if input_bytes is None else input_bytes
    saves = norm_saves(spec).when(grad_in, weight)
    return saves.bytes(t, spec.model.hidden, r, input_saved) if saves is not None else 0


def rmsnorm(tokens: int, hidden: int, d: Dtypes) -> int:
    return RMS_NORM.bytes(tokens, hidden, d.residual)


def layernorm(tokens: int, hidden: int, d: Dtypes) -> int:
    return LAYER_NORM.bytes(tokens, hidden, d.residual)


# --- attention ------------------------------------------------------------------------------------------------


def attention_kernel(spec: RunSpec, heads_broadcast: bool = False) -> str:
    """Which attention kernel runs: "flash" (SDPA's fused kernels: no (B, H, S, S) tensor), "math" (SDPA's
    fallback, which stores the probabilities: on CPU with dropout, or with k/v heads broadcast to the query heads
    instead of `enable_gqa`) or "eager" (the model's own softmax(QKᵀ)V)."""
    if spec.attn_impl == "eager":
        return "eager"
    attn_dropout, _ = dropouts(spec)
    if heads_broadcast or (attn_dropout > 0 and dtypes(spec).device != "cuda"):
        return "math"
    return "flash"


def flash_core(tokens: int, batch: int, seq: int, n_heads: int, q_dim: int, kv_dim: int, c: int) -> int:
    """Fused SDPA saves q, k, v (k, v at their own head count), the output and an fp32 log-sum-exp per row."""
    return tokens * (2 * q_dim + 2 * kv_dim) * c + batch * n_heads * seq * F32


def math_core(tokens: int, batch: int, seq: int, n_heads: int, q_dim: int, p: float, d: Dtypes) -> int:
    """SDPA's math fallback: the scaled q, k and v expanded to every query head and the softmax (fp32 on CPU),
    with dropout its mask and the dropped probabilities; excludes the output's re-laid-out copy."""
    e = F32 if d.device == "cpu" else d.compute
    scores = batch * n_heads * seq * seq
    return 3 * tokens * q_dim * e + scores * (e + (d.mask(e) + e if p > 0 else 0))


def attention_core_bytes(spec: RunSpec, tokens: int | None = None, seq: int | None = None) -> int:
    """What one Llama/BERT attention layer's score/softmax/value part saves (q, k, v after projection onward),
    excluding the projections' input. `tokens`/`seq` let chunked techniques ask for a slice (tokens = batch·seq)."""
    m, d = spec.model, dtypes(spec)
    s = spec.seq if seq is None else seq
    t = spec.tokens if tokens is None else tokens
    batch = t // s if s else 0
    c = d.compute
    q_dim, kv_dim = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    scores = batch * m.n_heads * s * s
    attn_dropout, _ = dropouts(spec)
    kernel = attention_kernel(spec)
    if kernel == "flash":  # k, v stay at kv heads
        return flash_core(t, batch, s, m.n_heads, q_dim, kv_dim, c)
    if kernel == "math":
        return math_core(t, batch, s, m.n_heads, q_dim, attn_dropout, d) + t * q_dim * c
    # eager: k and v repeated to all heads (GQA), fp32 softmax, its low-precision copy for the PV matmul,
    # dropout mask and dropped probabilities where dropout is on, then the re-laid-out output for o_proj
    probs = scores * F32
    if attn_dropout > 0:
        probs += scores * d.mask(F32) + scores * c
    elif c != F32:
        probs += scores * c
    return 3 * t * q_dim * c + probs + t * q_dim * c


def attention_output_core(spec: RunSpec) -> int:
    """`attention_core_bytes` plus, under SDPA's fused kernel, the copy of its output re-laid out for the output
    projection when q reaches the kernel head-major (`Arch.relaid_output`)."""
    m, a = spec.model, spec.model.arch
    relaid = attention_kernel(spec) == "flash" and a is not None and a.relaid_output
    return attention_core_bytes(spec) + (spec.tokens * m.n_heads * m.head_dim * dtypes(spec).compute if relaid else 0)


def residual_dropout(spec: RunSpec) -> int:
    """The mask of a dropout on a branch's output (hidden size, compute dtype), 0 when the hidden dropout is off."""
    d = dtypes(spec)
    return dropout_mask(spec.tokens * spec.model.hidden, dropouts(spec)[1], d.compute, d)


def eager_probs(scores: int, p: float, d: Dtypes, cast_before_dropout: bool) -> int:
    """The fp32 softmax, its copy in the compute dtype (when different) and dropout's mask and result.
    `cast_before_dropout`: the probabilities are cast to the value's dtype first (GPT-2, NeoX), so mask and
    result are in the compute dtype; otherwise dropout runs on the fp32 probabilities (BERT)."""
    c = d.compute
    out = scores * F32
    if p > 0 and cast_before_dropout:
        return out + scores * (d.mask(c) + c)
    if p > 0:
        return out + scores * (d.mask(F32) + c)
    return out + (scores * c if c != F32 else 0)


# --- outside the blocks -------------------------------------------------------------------------------------


def causal_lm_loss(spec: RunSpec, tokens: int | None = None) -> dict[str, int]:
    """`loss`: fp32 log-probabilities, shifted labels and two scalars; `logits`: only when the caller keeps the
    model output (`spec.extra["keep_logits"]`): the run loop's loss function drops them."""
    t = spec.tokens if tokens is None else tokens
    keep = bool(spec.extra.get("keep_logits", False))
    return {"loss": t * spec.model.vocab * F32 + t * I64 + 2 * F32,
            "logits": t * spec.model.vocab * dtypes(spec).compute if keep else 0}


def rotary_tables(seq: int, dim: int, d: Dtypes) -> int:
    """cos and sin, one row per position, shared by every layer."""
    return 2 * seq * dim * d.residual


def plain_mlp(tokens: int, hidden: int, inter: int, act, d: Dtypes, uses: int = 1) -> int:
    """fc2(act(fc1(x))): fc1's input (`uses` projections read it: one shared tensor, or a cast copy each under
    autocast), what act saves, and its output fc2 reads (unless act saved it: ReLU)."""
    c = d.compute
    return matmul_inputs(tokens, hidden, uses, d) + act.bytes(tokens, inter, c) + (
        0 if act.output else tokens * inter * c)


def causal_head(spec: RunSpec, embeddings: int, flow=None) -> dict[str, int]:
    """A causal LM's parts outside the blocks: `embeddings` (given), the final norm, the LM head's input, the loss.
    With a partly frozen model's `flow` (`arch/flow.py`): the final norm as its input and weight need, the head's
    input only when the head trains."""
    d = dtypes(spec)
    grad_in, norm, head = (True, True, True) if flow is None else (flow.grad_out, flow.norm, flow.head)
    return {"embeddings": embeddings, "final_norm": norm_bytes(spec, grad_in=grad_in, weight=norm),
            "head": matmul_inputs(spec.tokens, spec.model.hidden, 1, d) if head else 0, **causal_lm_loss(spec)}


def block_temporaries(spec: RunSpec, gated: bool, scores_extra: int = 0) -> tuple[int, int]:
    """(MLP, attention) transients of one block's backward. MLP: the gradients of its hidden activations alive at
    once — the incoming one and the activation's own backward (`Saves.backward`), plus up's for a gated MLP — and
    of its input. Attention: gradients of q, k, v and the input, or, where the probabilities are stored, of the
    (B, H, S, S) scores (two fp32) with `scores_extra` more. Both: a tied LM head's gradient, held until the
    embedding's arrives (`tied_head_gradient`)."""
    m, d, t = spec.model, dtypes(spec), spec.tokens
    c, r = d.compute, d.residual
    act = m.arch.act.backward if m.arch is not None else 1
    wide = 2 + act if gated else max(2, act)
    held = tied_head_gradient(spec)
    mlp = t * (wide * m.intermediate * c + m.hidden * r) + held
    q_dim, kv_dim = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    attn = t * ((2 * q_dim + 2 * kv_dim) * c + m.hidden * r)
    if attention_kernel(spec) != "flash":
        attn = max(attn, 2 * spec.batch * m.n_heads * spec.seq * spec.seq * F32 + 2 * t * m.hidden * r + scores_extra)
    return mlp, attn + held


def tied_head_gradient(spec: RunSpec) -> int:
    """A causal LM whose head is tied to the embedding table: autograd sums a parameter's gradients before it lands
    in `.grad`, so the head's contribution (one table, the parameter's dtype) waits through the whole backward."""
    m = spec.model
    if not (m.tie_embeddings and spec.task == "causal_lm"):
        return 0
    return max((p.nbytes for p in m.trainable if p.numel == m.vocab * m.hidden and len(p.shape) == 2), default=0)
