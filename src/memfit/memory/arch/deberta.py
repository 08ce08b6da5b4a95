"""DeBERTa-v2/v3 encoder blocks: BERT's post-norm layout with disentangled (content/position) attention.

He et al. 2021, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention"; He et al. 2023, "DeBERTaV3".
Recognised by `attention.self.{query_proj,key_proj,value_proj}`. transformers runs it eagerly only. Derived from
what autograd saves there, per block:

- content attention: the projections' input, q and the scaled kᵀ (and the scale, a scalar per score term), the
  padding mask (bool, per layer), the softmax — in the scores' dtype: the mask is filled in, not added in fp32 —,
  dropout's mask and result, v, the re-laid-out output;
- relative attention (`relative_attention`, R = 2·position buckets rows of relative embeddings): their dropout
  mask and the projections' input, and for each of content→position / position→content: the projected relative
  embeddings repeated over the batch, the int64 (S, S) gather index, the (B·H, S, R) scores before the gather;
  p2c also saves k itself;
- the output dropout masks, two LayerNorms, the MLP as BERT's.

Outside: the embeddings' LayerNorm, the padding mask they are multiplied by, the token-type ids when a type table
exists, the dropout mask; the relative-embedding LayerNorm's statistics; the pooler over [CLS] (a view of the last
hidden state under fp32), its activation and the classifier's dropout; DeBERTa's sequence-classification loss
also keeps the logits and a label index for its gather.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Arch, Family, UnsupportedArchitecture
from memfit.memory.arch.parts import F32, I64, dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import activation, dims, first, has


class DeBERTa(Family):
    name = "deberta"
    tasks = ("seq_cls", "token_cls")

    def describe(self, config, model, block, prefix):
        attn = getattr(getattr(block, "attention", None), "self", None)
        if not (has(attn, "query_proj", "key_proj", "value_proj") and has(getattr(block, "output", None),
                                                                          "dense", "LayerNorm")):
            return None
        relative = bool(getattr(config, "relative_attention", False))
        kinds = tuple(getattr(config, "pos_att_type", None) or ()) if relative else ()
        if relative and (not getattr(config, "share_att_key", False) or set(kinds) - {"c2p", "p2c"}):
            raise UnsupportedArchitecture(f"relative attention without share_att_key, or of kinds {kinds}, "
                                          "is not modelled")
        span = first(config, "position_buckets", default=-1)
        if span is None or span <= 0:
            span = first(config, "max_relative_positions", default=-1)
            span = span if span and span > 0 else config.max_position_embeddings
        hidden_p = float(first(config, "hidden_dropout_prob", default=0.0))
        pooler = getattr(model, "pooler", None)
        arch = Arch(
            family=self.name, norm=probe(block.output.LayerNorm), gated=False, rotary_dim=0,
            act=activation(getattr(block.intermediate, "intermediate_act_fn", None), config, "hidden_act"),
            attn_dropout=float(first(config, "attention_probs_dropout_prob", default=0.0)),
            hidden_dropout=hidden_p, embd_dropout=hidden_p,
            options=(("relative", kinds), ("span", int(span)),
                     ("token_types", (getattr(config, "type_vocab_size", 0) or 0) > 0),
                     ("pooler_act", activation(None, config, "pooler_hidden_act") if pooler is not None else None),
                     ("pooler_dropout", float(first(config, "pooler_dropout", default=0.0))),
                     ("cls_dropout", float(first(config, "cls_dropout", default=hidden_p)))),
        )
        return arch, dims(config, config.intermediate_size)

    def layer(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        c, r = d.compute, d.residual
        b, s, h = spec.batch, spec.seq, m.hidden
        attn_p, hidden_p = parts.dropouts(spec)
        scores = b * m.n_heads * s * s
        drop = parts.residual_dropout(spec)
        kinds = a.option("relative", ())
        # q, the scaled kᵀ and its scale, the padding mask, the softmax in the scores' dtype (the mask is filled in,
        # not added in fp32), dropout's mask and result, v, the re-laid-out context
        probs = scores * (c + (d.mask(c) + c if attn_p > 0 else 0))
        attention = (parts.matmul_inputs(t, h, 3, d) + 2 * t * h * c + (1 + len(kinds)) * c + b * s * s + probs
                     + 2 * t * h * c + drop)
        if kinds:
            rows = 2 * a.option("span")
            attention += parts.dropout_mask(rows * h, hidden_p, r, d) + parts.matmul_inputs(rows, h, 2, d)
            attention += len(kinds) * (b * h * rows * c + s * s * I64 + b * m.n_heads * s * rows * c)
            attention += t * h * c if "p2c" in kinds else 0  # k itself
        act = a.act.bytes(t, m.intermediate, c) + (0 if a.act.output else t * m.intermediate * c)
        mlp = parts.matmul_inputs(t, h, 1, d) + act + drop
        return {"attention": attention, "mlp": mlp, "norms": 2 * parts.norm_bytes(spec)}

    def head(self, spec):
        m, a, d, t = spec.model, spec.model.arch, dtypes(spec), spec.tokens
        self.check_task(spec, a.model_type)
        c, r, b, h = d.compute, d.residual, spec.batch, m.hidden
        labels = max(m.num_labels, 1)
        keep = bool(spec.extra.get("keep_logits", False))
        _, hidden_p = parts.dropouts(spec)
        embeddings = (parts.norm_bytes(spec) + t * r  # LayerNorm, the padding mask it is multiplied by
                      + parts.dropout_mask(t * h, parts.embedding_dropout(spec), r, d)
                      + (t * I64 if a.option("token_types") else 0))
        if a.option("relative"):  # LayerNorm over the relative embeddings (a parameter): its statistics
            embeddings += 2 * 2 * a.option("span") * F32
        out = {"embeddings": embeddings, "final_norm": 0}
        if spec.task == "seq_cls":
            pooler_in = b * h * c if d.autocast else t * h * r  # the [CLS] slice: a view under fp32
            act = a.option("pooler_act")
            pooled = act.bytes(b, h, c) + (0 if act.output else 0)
            out["head"] = (parts.dropout_mask(b * h, a.option("pooler_dropout"), r, d) + pooler_in + pooled
                           + parts.dropout_mask(b * h, a.option("cls_dropout"), c, d) + b * h * c)
            # logits and a label index kept by the loss's gather, then log-probs, labels, scalar
            out["loss"] = b * labels * c + b * I64 + b * labels * F32 + b * I64 + F32
            out["logits"] = b * labels * c if keep else 0
        else:
            out["head"] = parts.dropout_mask(t * h, hidden_p, r, d) + parts.matmul_inputs(t, h, 1, d)
            out["loss"] = t * labels * F32 + t * I64 + 2 * F32
            out["logits"] = t * labels * c if keep else 0
        return out

    def temporaries(self, spec):
        """As BERT's. (The relative attention's gather backward holds more — 1.6× at S = 32 — but only in the
        lowest layers' backward, when most activations are freed; charging it to the top block, where the step
        phases put block transients, over-predicts the step peak by 10 %.)"""
        return parts.block_temporaries(spec, False, spec.tokens * spec.model.hidden * dtypes(spec).compute)
