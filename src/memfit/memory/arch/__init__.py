"""Architecture knowledge for the memory model: one block family per file, each recognising models by their
modules and config, not by name.

`describe(model)` finds the model's blocks and asks each family in `FAMILIES` (most specific first) whether the
first block is one of its own; the winner fills an `Arch` (facts its formulas read) and the `ModelShape`
numbers. `family_of(shape)` returns the family whose formulas `memory/estimate.py` delegates to; a model no
family recognises gets one `UnsupportedArchitecture` error naming its model_type and what is missing, raised
when an activation estimate is asked for (its parameters, gradients and optimizer state are still counted).

This package sits below `memory/spec.py` (whose `model_shape` calls `describe`): it takes `ModelShape` and
`RunSpec` objects but never imports that module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memfit.memory.arch.base import Arch, Family, UnsupportedArchitecture
from memfit.memory.arch.names import ROUTER_SUFFIXES, in_block, is_embedding, is_router  # noqa: F401 (re-exported)
from memfit.memory.arch.bert import Bert
from memfit.memory.arch.deberta import DeBERTa
from memfit.memory.arch.falcon import Falcon
from memfit.memory.arch.gemma import Gemma
from memfit.memory.arch.gpt2 import GPT2
from memfit.memory.arch.llama import Llama
from memfit.memory.arch.moe import MoE
from memfit.memory.arch.neox import NeoX
from memfit.memory.arch.opt import OPT
from memfit.memory.arch.phi import Phi

__all__ = ["FAMILIES", "Arch", "Family", "UnsupportedArchitecture", "describe", "family_of", "in_block",
           "is_embedding"]

FAMILIES: tuple[Family, ...] = (Gemma(), MoE(), Llama(), GPT2(), OPT(), NeoX(), Phi(), Falcon(), DeBERTa(), Bert())
_BY_NAME = {f.name: f for f in FAMILIES}


def describe(model: nn.Module, config: Any) -> tuple[Arch, dict]:
    """(facts, `ModelShape` numbers) of a transformers model, or `UnsupportedArchitecture`."""
    model_type = getattr(config, "model_type", "") or type(model).__name__
    prefix, blocks = _blocks(model, config)
    if blocks is None:
        raise UnsupportedArchitecture(
            f"memfit has no memory model for model_type '{model_type}': no list of "
            f"{getattr(config, 'num_hidden_layers', '?')} identical blocks found in {type(model).__name__}")
    block = blocks[0]
    for family in FAMILIES:
        try:
            found = family.describe(config, model, block, prefix)
        except UnsupportedArchitecture as exc:
            raise UnsupportedArchitecture(f"memfit has no memory model for model_type '{model_type}' "
                                          f"({family.name} block family): {exc}") from None
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:  # a config or module the
            # family's reading cannot take (RuntimeError: a probed module refusing the probe's input)
            raise UnsupportedArchitecture(f"memfit has no memory model for model_type '{model_type}': its "
                                          f"{type(block).__name__} looks like a {family.name} block but reading it "
                                          f"failed ({exc})") from None
        if found is not None:
            arch, dims = found
            return _with_params(arch, model, prefix, model_type), {**dims, "n_layers": len(blocks)}
    children = ", ".join(n for n, _ in block.named_children())
    raise UnsupportedArchitecture(
        f"memfit has no memory model for model_type '{model_type}': its block {type(block).__name__} "
        f"({children}) matches none of the block families ({', '.join(_BY_NAME)})")


def family_of(shape: ModelShape) -> Family:
    """The family whose formulas estimate `shape`'s activations (`UnsupportedArchitecture` if none)."""
    family = _BY_NAME.get(shape.family)
    if family is None:
        raise UnsupportedArchitecture(shape.unsupported or f"memfit has no memory model for family '{shape.family}'")
    return family


def _blocks(model: nn.Module, config: Any) -> tuple[str, nn.ModuleList | None]:
    """The model's repeated blocks: the longest `ModuleList` of one class (the config's layer count if it says)."""
    want = getattr(config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList | None] = ("", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(m) for m in module}) != 1 or (want and len(module) != want):
            continue
        if best[1] is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def _with_params(arch: Arch, model: nn.Module, prefix: str, model_type: str) -> Arch:
    """Name the blocks' prefix and the embedding modules: each table, or the embeddings container holding it
    (BERT's, whose norm runs before the blocks)."""
    from dataclasses import replace

    embedding: set[str] = set()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.Embedding):
            parent = name.rpartition(".")[0]
            embedding.add(parent if "embedding" in type(modules.get(parent, model)).__name__.lower() else name)
    return replace(arch, model_type=model_type, layer_prefix=prefix, embedding_modules=tuple(sorted(embedding)))
