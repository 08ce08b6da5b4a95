"""Quantized embedding tables and output layer: the same storage formats as the linear layers.

In a small or large-vocabulary model the token embedding and the LM head are a large share of the weights (8 of
11.6 MiB in the inference bench model), so leaving them in fp32 caps int8 at 0.79× the fp32 bytes. llama.cpp's
k-quants store both (`token_embd` / `output` tensors in Q4_K … Q8_0; Gerganov et al., ggml), and Dettmers et al.
2022 (LLM.int8()) quantize every linear layer's weight with per-row absmax, which is the same layout as an
embedding table read row by row. Here:

- `QuantEmbedding` stores an (num_embeddings, dim) table in any `WeightFormat` (it is a `QuantLinear` with
  `out_features = num_embeddings`, `in_features = dim`, so storage, saving and the estimate are the linear
  layer's); a lookup decodes only the rows it reads (`WeightFormat.decode_rows`: the gathered codes times their
  scales), never the whole table.
- The output layer becomes a `QuantLinear`; when it is tied to the embedding (one tensor in the dense model), the
  quantized head shares the embedding's stored tensors, so the tie costs nothing.

`quantize_embeddings(model, fmt, group_size)` does both; `weights: {name: int8, embeddings: true}` in a recipe or
`--quantize-embeddings` on `memfit generate` ask for it.
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.format import WeightFormat, get_format
from memfit.weights.linear import QuantLinear, set_submodule


class QuantEmbedding(QuantLinear):
    """An `nn.Embedding` whose table is stored in a `WeightFormat`; a lookup decodes only the rows it reads.

    `embed_scale` (Gemma's scaled word embeddings) multiplies the looked-up rows, as the module it replaces did."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str | WeightFormat,
                 group_size: int | None = None, padding_idx: int | None = None, embed_scale: float | None = None,
                 device: torch.device | str | None = None, shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> None:
        super().__init__(embedding_dim, num_embeddings, fmt, group_size, device=device, shapes=shapes)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.embed_scale = embed_scale

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str | WeightFormat, group_size: int | None = None
                       ) -> QuantEmbedding:
        if type(emb).forward is not nn.Embedding.forward and not hasattr(emb, "embed_scale"):
            raise ConfigError(f"cannot quantize the embedding {type(emb).__name__}: its forward differs from "
                              "nn.Embedding's; quantize without embeddings (embeddings: false)")
        scale = getattr(emb, "embed_scale", None)
        scale = None if scale is None else float(scale)
        w = emb.weight.detach().float()
        q = cls(emb.num_embeddings, emb.embedding_dim, fmt, group_size, emb.padding_idx, scale, device=w.device)
        q.load_tensors(q.format.encode(w, q.group_size))
        q.compute_dtype = emb.weight.dtype
        return q

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = self.format.decode_rows(self.tensors(), input_ids.reshape(-1), self.out_features, self.in_features)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale
        return rows.to(self.compute_dtype).view(*input_ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}, group_size={self.group_size}"
                + ("" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"))


def tied_head(embedding: QuantEmbedding, bias: bool = False) -> QuantLinear:
    """A `QuantLinear` output layer that shares `embedding`'s stored tensors (a tied LM head)."""
    head = QuantLinear(embedding.in_features, embedding.out_features, embedding.format, embedding.group_size,
                       bias=bias, device="meta", shapes={k: v.shape for k, v in embedding.tensors().items()})
    for name in head.tensors():
        head._parameters[name] = embedding._parameters[name]
    if bias:
        head.bias = nn.Parameter(torch.zeros(embedding.out_features), requires_grad=False)
    head.compute_dtype = embedding.compute_dtype
    return head


def output_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's output layer (transformers' `get_output_embeddings`), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name, mod
    return None


def quantize_embeddings(model: nn.Module, fmt: str | WeightFormat, group_size: int | None = None) -> list[str]:
    """Replace every `nn.Embedding` with a `QuantEmbedding` and the output layer with a `QuantLinear` (sharing
    the embedding's tensors when tied), in place. Returns the names replaced; `ConfigError` if there is none."""
    fmt = get_format(fmt)
    head = output_layer(model)
    head_weight = getattr(head[1], "weight", None) if head is not None else None
    replaced, tied = [], None
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Embedding):
            q = QuantEmbedding.from_embedding(mod, fmt, group_size)
            if head_weight is not None and mod.weight is head_weight:
                tied = q
            set_submodule(model, name, q)
            replaced.append(name)
    if head is not None and isinstance(head[1], nn.Linear):
        name, lin = head
        new = (tied_head(tied, lin.bias is not None) if tied is not None
               else QuantLinear.from_linear(lin, fmt, group_size))
        if tied is not None and lin.bias is not None:
            new.bias.data.copy_(lin.bias.detach().float())
        set_submodule(model, name, new)
        replaced.append(name)
    if not replaced:
        raise ConfigError("quantizing embeddings: the model has no nn.Embedding and no linear output layer")
    left = [n for n, m in model.named_modules() if type(m) is nn.Embedding]
    if left:
        from memfit.compat import fail

        raise fail(f"embeddings {left[:3]} are still dense after replacement",
                   "each nn.Embedding to be an attribute of its parent module", ("torch", "transformers"))
    return replaced


def shared_tensors(model: nn.Module) -> dict[str, str]:
    """{module: the module whose stored tensors it shares} for quantized modules tied to an earlier one."""
    owners: dict[int, str] = {}
    tied = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            key = id(mod.tensors()[mod._tensor_names[0]])
            if key in owners:
                tied[name] = owners[key]
            else:
                owners[key] = name
    return tied
