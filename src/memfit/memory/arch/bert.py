"""BERT-like encoder blocks (BERT, RoBERTa, MiniLM): post-norm, learned absolute positions, dropout everywhere.

Devlin et al. 2019; Liu et al. 2019 ("RoBERTa"). Recognised by `attention.self.{query,key,value}`,
`intermediate.dense` and `output.{dense,LayerNorm}`. Derived from what autograd saves in transformers:

- attention: the projections' input, the kernel's tensors (on CPU, SDPA with dropout in training falls back to
  the math kernel that stores the probabilities), the dropout mask after the output projection;
- MLP: its input, what the activation saves, its output, the dropout mask; two LayerNorms;
- embeddings: LayerNorm, dropout mask, the token-type ids taken from the buffer (one row); RoBERTa computes
  position ids from the input ids and gathers the token types, two int64 per token;
- heads: BERT's pooler over [CLS] (under fp32 the slice is a view, so it keeps the whole last hidden state
  alive), tanh, dropout, classifier; RoBERTa's classification head (dropout, dense, tanh, dropout, out_proj) on
  the [CLS] vector; token classification: dropout and classifier over every token.
"""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import GELU, LAYER_NORM, Arch, Family
from memfit.memory.arch.parts import F32, I64, dtypes
from memfit.memory.arch.probe import probe
from memfit.memory.arch.read import activation, dims, first, has

_DEFAULT = Arch(family="bert", norm=LAYER_NORM, act=GELU, gated=False, rotary_dim=0, attn_dropout=0.1,
                hidden_dropout=0.1, embd_dropout=0.1)


class Bert(Family):
    name = "bert"
    tasks = ("seq_cls", "token_cls")

    def describe(self, config, model, block, prefix):
        attn = getattr(block, "attention", None)
        if not (has(getattr(attn, "self", None), "query", "key", "value")
                and has(getattr(block, "intermediate", None), "dense") and has(getattr(block, "output", None),
                                                                              "dense", "LayerNorm")):
            return None
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        embeddings = getattr(base, "embeddings", None)
        classifier = getattr(model, "classifier", None)
        hidden_drop = float(first(config, "hidden_dropout_prob", default=0.0))
        arch = Arch(
            family=self.name, norm=probe(block.output.LayerNorm), gated=False,
            act=activation(getattr(block.intermediate, "intermediate_act_fn", None), config, "hidden_act"),
            attn_dropout=float(first(config, "attention_probs_dropout_prob", default=0.0)),
            hidden_dropout=hidden_drop, embd_dropout=hidden_drop,
            options=(("positions_from_ids", has(embeddings, "padding_idx")),
                     ("cls_head", has(classifier, "dense", "out_proj"))),
        )
        return arch, dims(config, config.intermediate_size)

    def layer(self, spec):
        m, a, d, t = spec.model, _arch(spec), dtypes(spec), spec.tokens
        c = d.compute
        drop = parts.residual_dropout(spec)
        attention = parts.matmul_inputs(t, m.hidden, 3, d) + parts.attention_core_bytes(spec) + drop
        act = a.act.bytes(t, m.intermediate, c) + (0 if a.act.output else t * m.intermediate * c)
        mlp = parts.matmul_inputs(t, m.hidden, 1, d) + act + drop  # act in/out (GELU), mask
        return {"attention": attention, "mlp": mlp, "norms": 2 * parts.norm_bytes(spec)}

    def head(self, spec):
        m, a, d, t = spec.model, _arch(spec), dtypes(spec), spec.tokens
        if m.arch is not None:
            self.check_task(spec, a.model_type)
        c, r = d.compute, d.residual
        labels = max(m.num_labels, 1)
        keep_logits = bool(spec.extra.get("keep_logits", False))
        _, hidden_dropout = parts.dropouts(spec)
        ids = 2 * t * I64 if a.option("positions_from_ids") else spec.seq * I64
        out = {"embeddings": (parts.norm_bytes(spec)
                              + parts.dropout_mask(t * m.hidden, parts.embedding_dropout(spec), r, d) + ids),
               "final_norm": 0}
        if spec.task == "seq_cls":
            b = spec.batch
            drop = parts.dropout_mask(b * m.hidden, hidden_dropout, c, d)
            if a.option("cls_head"):  # dropout on the [CLS] vector, dense, tanh, dropout, out_proj
                dense_in = parts.matmul_inputs(b, m.hidden, 1, d)
                if not hidden_dropout and not d.autocast:  # the undropped [CLS] slice is a view of the last state
                    dense_in = t * m.hidden * r
                out["head"] = (parts.dropout_mask(b * m.hidden, hidden_dropout, r, d) + dense_in
                               + b * m.hidden * c + drop + b * m.hidden * c)  # tanh out, mask, out_proj in
            else:  # pooler input: the [CLS] slice is a view, so fp32 keeps the whole last hidden state alive
                pooler_in = b * m.hidden * c if d.autocast else t * m.hidden * r
                out["head"] = pooler_in + b * m.hidden * c + drop + b * m.hidden * c  # tanh out, mask, classifier
            out["loss"] = b * labels * F32 + b * I64 + 2 * F32  # log-probs, flattened labels, scalars
            out["logits"] = b * labels * c if keep_logits else 0
        else:  # token classification
            drop = parts.dropout_mask(t * m.hidden, hidden_dropout, r, d)
            out["head"] = drop + parts.matmul_inputs(t, m.hidden, 1, d)
            out["loss"] = t * labels * F32 + t * I64 + 2 * F32
            out["logits"] = t * labels * c if keep_logits else 0
        return out

    def temporaries(self, spec):
        return parts.block_temporaries(spec, False, spec.tokens * spec.model.hidden * dtypes(spec).compute)


def _arch(spec) -> Arch:
    return spec.model.arch or _DEFAULT
