"""StreamBP — Luo et al. 2025, "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training
of LLMs".

Exact backprop decomposed along the sequence, layer by layer. Forward (no graph) keeps only each decoder
layer's input. Backward walks the layers from the top; for one layer it rebuilds the full-sequence keys and
values once (with their graph: norm → k/v projections → RoPE; only `kv_dim` wide), then for each sequence chunk
— last chunk first — recomputes the chunk's queries, attention against the keys/values of positions up to the
chunk's end (causal), MLP and residuals, and backpropagates the chunk's output gradient. Gradients reaching
the detached keys/values are accumulated over chunks and pushed through the k/v path once at the end. The LM
head and cross-entropy run one chunk at a time as well, so activation and logit memory scale with the chunk,
not the sequence; the result equals plain backprop up to summation order.

For decoders with Llama's layer layout and standard or grouped attention: Llama, Mistral (while a sequence fits its
sliding window), Qwen2, Qwen3 (per-head q/k norms); others get one `ConfigError` naming what they have. Its chunked
layer is checked against the model's own forward when applied (`check_matches_model`). Replaces forward+backward
of a micro-batch (`wrap_forward_backward`), so it subsumes checkpointing and chunked CE.

    activations: [{name: streambp, chunk_size: 512}]
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.errors import ConfigError
from memfit.memory import estimate as est
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import (
    Batch,
    Context,
    ForwardBackward,
    Technique,
    TechniqueConfig,
)

_INCOMPATIBLE = {
    "checkpointing": "StreamBP already recomputes every layer",
    "chunked_ce": "StreamBP already computes the loss one chunk at a time",
    "offload": "StreamBP keeps no saved tensors across layers to offload",
    "mesa": "StreamBP keeps no saved tensors across layers to compress",
    "s2a": "StreamBP keeps no saved tensors across layers to compress",
}


class StreamBPConfig(TechniqueConfig):
    chunk_size: int = Field(512, gt=0, description="sequence positions per chunk")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _heads(attn: nn.Module, proj: str, norm: str, hn: torch.Tensor) -> torch.Tensor:
    """A projection's output as (batch, heads, positions, head_dim), through its per-head norm if the attention has
    one (Qwen3's q_norm / k_norm)."""
    b, s, _ = hn.shape
    x = getattr(attn, proj)(hn).view(b, s, -1, attn.head_dim)
    if hasattr(attn, norm):
        x = getattr(attn, norm)(x)
    return x.transpose(1, 2)


def _keys_values(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    attn = layer.self_attn
    hn = layer.input_layernorm(x)
    return _rope(_heads(attn, "k_proj", "k_norm", hn), cos, sin), _heads(attn, "v_proj", "v_norm", hn)


def _chunk_forward(layer: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                   cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer's output for positions [start, start + x.shape[1]) given all keys/values."""
    attn = layer.self_attn
    b, n, _ = x.shape
    end = start + n
    hn = layer.input_layernorm(x)
    q = _rope(_heads(attn, "q_proj", "q_norm", hn), cos, sin)
    o = F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=attn.scaling,
                                       enable_gqa=k.shape[1] != q.shape[1])
    h = x + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _spans(seq: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, seq)) for s in range(0, seq, chunk)]


def _chunk_mask(start: int, end: int, keep: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean (batch|1, 1, chunk, end) mask: causal, and padded keys hidden (a query that would see no key
    keeps its causal row; its output is never used by the loss)."""
    q_pos = torch.arange(start, end, device=device)[:, None]
    mask = (torch.arange(end, device=device)[None, :] <= q_pos)[None, None]
    if keep is not None:
        padded = mask & keep[:, None, None, :end].bool()
        mask = torch.where(padded.any(-1, keepdim=True), padded, mask)
    return mask


def llama_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, lm_head) of a causal LM with Llama's layer layout — norm → q/k/v projections (GQA or not, with
    biases or per-head q/k norms) → rotary → attention → o_proj → residual → norm → MLP → residual: Llama, Mistral,
    Qwen2, Qwen3 and same-shaped models; `ConfigError` naming what a model has that StreamBP does not cover."""
    inner = c.unwrap(model)
    body = getattr(inner, "model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    layers = getattr(body, "layers", None)
    name = type(inner).__name__
    if head is None or layers is None or not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        raise ConfigError(f"streambp supports decoders with Llama's layout (Llama, Mistral, Qwen2, Qwen3); got {name}, "
                          "which has no `model.layers` with rotary embeddings and a final norm")
    allowed = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        # dropouts that never drop are no part; one that does would differ between StreamBP's recomputes
        extra = {n for n, m in layer.named_children() if not (isinstance(m, nn.Dropout) and m.p == 0)} - allowed
        if attn is None or extra or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            what = (f"extra block parts {sorted(extra)}" if extra else
                    "a fused q/k/v projection" if hasattr(attn, "qkv_proj") else "no q/k/v/o projections")
            raise ConfigError(f"streambp supports decoders with Llama's layer layout; {name} has {what}")
    config = inner.config
    if getattr(config, "attention_dropout", 0.0):
        raise ConfigError("streambp needs attention_dropout = 0 (dropout masks would differ between recomputes)")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        raise ConfigError(f"streambp does not support logit soft-capping ({name})")
    if float(getattr(body, "normalizer", getattr(config, "embedding_multiplier", 1.0)) or 1.0) != 1.0 or (
            "gemma" in str(getattr(config, "model_type", ""))):
        raise ConfigError(f"streambp does not support {name}: its embeddings are scaled inside the model's forward")
    return body, head


def sliding_window(model: nn.Module) -> int:
    """Tokens a sliding-window layer attends to (0: every layer attends to the whole prefix)."""
    config = c.unwrap(model).config
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 sets a window it does not use
        return 0
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return 0
    return int(getattr(config, "sliding_window", None) or 0)


def check_window(model: nn.Module, seq: int) -> None:
    """StreamBP's chunk masks are causal over the whole prefix: exact only while a sequence fits the window."""
    window = sliding_window(model)
    if window and seq > window:
        raise ConfigError(f"streambp does not support sliding-window attention beyond the window: sequences of {seq} "
                          f"tokens, window {window} ({type(c.unwrap(model)).__name__}); use sequences of at most "
                          f"{window} tokens or another activation technique")


@torch.no_grad()
def _stream_layers(body: nn.Module, x: torch.Tensor, spans: list[tuple[int, int]], masks: dict, positions,
                   autocast=nullcontext):
    """The no-grad forward through every layer, chunk by chunk: (last hidden state before the final norm, each
    layer's input, cos, sin)."""
    with autocast():
        cos, sin = body.rotary_emb(x, positions)
    inputs: list[torch.Tensor] = []
    with autocast():
        for layer in body.layers:
            inputs.append(x)
            k, v = _keys_values(layer, x, cos, sin)
            x = torch.cat([_chunk_forward(layer, x[:, s:e], k, v, s, cos[:, s:e], sin[:, s:e], masks[s])
                           for s, e in spans], dim=1)
            del k, v
    return x, inputs, cos, sin


@torch.no_grad()
def check_matches_model(model: nn.Module, chunk: int = 4, seq: int = 11) -> None:
    """StreamBP re-implements the Llama layer from its parts (projections, rotary, norms); its chunked forward must
    equal the model's own on a short random sequence, or a transformers release changed the layer under it."""
    body, _ = llama_parts(model)
    device = body.embed_tokens.weight.device
    ids = torch.randint(0, body.embed_tokens.num_embeddings, (1, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    spans = _spans(seq, chunk)
    masks = {s: _chunk_mask(s, e, None, device) for s, e in spans}
    was_training = model.training
    model.eval()
    try:
        x, _, _, _ = _stream_layers(body, body.embed_tokens(ids), spans, masks, torch.arange(seq, device=device)[None])
        got = body.norm(x).float()
        want = body(input_ids=ids, use_cache=False).last_hidden_state.float()
    finally:
        model.train(was_training)
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    if not error < 1e-3:
        from memfit.compat import fail

        raise fail(f"streambp's chunked layer differs from the model's own forward (relative error {error:.2g})",
                   "a Llama decoder layer computing norm → q/k/v projections → rotary → attention → o_proj → "
                   "residual → norm → MLP → residual", ("transformers",))


def streambp_forward_backward(model: nn.Module, batch: Batch, loss_scale: float, chunk_size: int,
                              autocast=nullcontext) -> torch.Tensor:
    """Mean next-token loss of `batch`; accumulates `loss_scale` × its exact gradient into `.grad`."""
    c.check_chunk(chunk_size)
    body, head = llama_parts(model)
    ids = batch["input_ids"]
    keep = batch.get("attention_mask")
    seq = ids.shape[1]
    check_window(model, seq)
    spans = _spans(seq, chunk_size)
    masks = {s: _chunk_mask(s, e, keep, ids.device) for s, e in spans}
    positions = torch.arange(seq, device=ids.device)[None]

    with autocast():
        emb = body.embed_tokens(ids)
    x, inputs, cos, sin = _stream_layers(body, emb.detach(), spans, masks, positions, autocast)

    targets = c.shifted_labels(batch)
    n_valid = int((targets != c.IGNORE_INDEX).sum().clamp_min(1))
    grad = torch.empty_like(x)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for s, e in spans:
        xc = x[:, s:e].detach().requires_grad_(True)
        with autocast():
            logits = head(body.norm(xc)).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets[:, s:e].flatten(), ignore_index=c.IGNORE_INDEX,
                                   reduction="sum")
        del logits
        (loss * (loss_scale / n_valid)).backward()
        grad[:, s:e] = xc.grad
        total += loss.detach()
    del x

    for layer in reversed(body.layers):
        x_in = inputs.pop()
        x_full = x_in.detach().requires_grad_(True)
        with autocast():
            k, v = _keys_values(layer, x_full, cos, sin)
        k_d, v_d = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
        grad_in = torch.empty_like(x_in)
        for s, e in reversed(spans):
            xc = x_in[:, s:e].detach().requires_grad_(True)
            with autocast():
                out = _chunk_forward(layer, xc, k_d, v_d, s, cos[:, s:e], sin[:, s:e], masks[s])
            out.backward(grad[:, s:e])
            grad_in[:, s:e] = xc.grad
            del out, xc
        torch.autograd.backward([k, v], [k_d.grad, v_d.grad])
        grad_in += x_full.grad
        grad = grad_in
        del x_in, x_full, k, v, k_d, v_d
    emb.backward(grad)
    return (total / n_valid).detach()


class StreamBP(Technique):
    """Replaces each micro-batch's forward+backward (`wrap_forward_backward`); estimates its own activations
    and step phases, which plain backprop's would overstate (the full sequence's logits never exist)."""

    name = "streambp"
    plan_options = ({"chunk_size": 256},)
    tasks = ("causal_lm",)
    conflicts = ("checkpointing", "chunked_ce", "offload", "mesa", "s2a", "layerwise")
    slot = "activations"
    Config = StreamBPConfig
    needs_gradients = True

    def check(self, ctx: Context) -> None:
        c.check_causal_lm(ctx, self.name)
        llama_parts(ctx.model)
        check_window(ctx.model, ctx.spec.seq)
        for t in ctx.techniques or []:
            if t is not self and t.name in _INCOMPATIBLE:
                raise ConfigError(f"streambp cannot be combined with '{t.name}': {_INCOMPATIBLE[t.name]}; "
                                  f"remove one of them")
            if t.slot == "optimizer" and getattr(t.config, "layerwise", False):
                raise ConfigError("streambp runs one backward per chunk, so a layer-wise (in-backward) optimizer "
                                  "would step once per chunk; set optimizer.layerwise: false")
            if t.slot == "step" and t.name != "backprop":
                raise ConfigError(f"streambp is a backprop method; it cannot run under step '{t.name}'")

    def apply(self, ctx: Context) -> None:
        check_matches_model(ctx.model)

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        chunk = self.config.chunk_size
        device = ctx.device
        bf16 = ctx.spec.compute_dtype == "bf16"

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

        def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
            return streambp_forward_backward(model, batch, loss_scale, chunk, autocast)

        return forward_backward

    # --- estimating ------------------------------------------------------------------------------------
    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(activations=lay.ids_bytes(spec) + lay.rope_bytes(spec) + self.working_bytes(spec))

    def working_bytes(self, spec: RunSpec) -> int:
        """Every layer's input kept (L+1 hidden states), plus the working set of one layer's backward: the
        full-sequence K/V path (norm, k/v projections and RoPE with their graph) and one chunk's layer
        activations, or one chunk's loss head (final norm, logits and log-probabilities, alive together as the
        chunk's loss is computed)."""
        m = spec.model
        chunk, batch = min(self.config.chunk_size, spec.seq), spec.batch
        inputs = (m.n_layers + 1) * lay.layer_input_bytes(spec)
        kv_path = spec.tokens * (3 * m.hidden + 1 + 5 * lay.kv_dim(spec)) * lay.act_bytes(spec)
        chunk_layer = lay.layer_bytes(spec, tokens=batch * chunk, seq=chunk)
        head = lay.norm_bytes(spec, batch * chunk) + lay.logits_bytes(spec, batch * chunk)
        grads = 2 * lay.layer_input_bytes(spec)  # the gradient w.r.t. the current layer's output and input
        return inputs + grads + max(kv_path + chunk_layer, head)

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """Predicted tensor total where a StreamBP step can peak (plain backprop's phases would put its peak at
        the full sequence's logits gradients, which StreamBP never materializes):

        - `head`: every layer's input and the top output kept, the output-gradient buffer, and one chunk's final
          norm, logits, log-probabilities and their two backward gradients;
        - `top_layer`: the first layer backward — the other inputs, incoming and outgoing gradient, the
          full-sequence K/V path with its graph and the K/V gradient accumulators, one chunk's layer
          activations, its attention against the prefix and its backward transients; the LM head's and this
          layer's gradients exist;
        - `embedding`: all gradients, one hidden-state gradient and the embedding's dense gradient;
        - `optimizer_step`: weights, state, gradients and the step's per-parameter transients.
        Within 2 % of the measured peak on llama-1m shapes at 1k–3k tokens (`tests/activations`), once the meter
        stopped keeping leaf tensors alive (`memfit.memory.measure`).
        """
        m, d = spec.model, est.dtypes(spec)
        chunk = min(self.config.chunk_size, spec.seq)
        chunk_tokens = spec.batch * chunk
        chunk_spec = spec.with_(seq=chunk)
        fixed = est.fixed_bytes(breakdown) + lay.ids_bytes(spec) + lay.rope_bytes(spec)
        held = breakdown.gradients if spec.grad_accum > 1 else 0
        hidden = lay.layer_input_bytes(spec)
        # the logits are freed before the chunk's backward; its log-probabilities (saved) and their gradients remain
        head = (lay.norm_bytes(spec, chunk_tokens) + est.head_components(chunk_spec.with_(batch=spec.batch))["loss"]
                + est.head_backward_temporaries(spec, chunk_tokens))
        kv = lay.kv_dim(spec)
        kv_path = spec.tokens * (3 * m.hidden + 1 + 5 * kv) * d.compute
        kv_grads = 2 * spec.tokens * kv * d.compute
        mlp_tmp, attn_tmp = est.block_backward_temporaries(chunk_spec)
        layer = kv_path + kv_grads + lay.layer_bytes(spec, tokens=chunk_tokens, seq=chunk) + max(mlp_tmp, attn_tmp)
        # the boolean causal masks of every chunk against its prefix, built once per step (one per sequence when
        # the batch carries an attention mask)
        fixed += spec.batch * sum((end - start) * end for start, end in _spans(spec.seq, chunk))
        grads_made = est.gradients_made
        return {
            "head": fixed + max(held, grads_made(spec, breakdown, 0)) + (m.n_layers + 2) * hidden + head,
            "top_layer": fixed + max(held, grads_made(spec, breakdown, 1)) + (m.n_layers + 2) * hidden + layer,
            "embedding": fixed + max(held, breakdown.gradients) + hidden + est.embedding_gradient_bytes(spec),
            "optimizer_step": (est.fixed_bytes(breakdown) + breakdown.gradients
                               + est.optimizer_step_transients(spec, breakdown)),
        }
