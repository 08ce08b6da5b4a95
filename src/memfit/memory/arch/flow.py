"""Where gradients flow in a run whose model is partly frozen (adapters, layer sampling, block-coordinate descent).

Autograd saves a tensor only for a gradient it will compute: an op whose inputs need no gradient records nothing,
and a frozen weight's op keeps only what its *input's* gradient needs (a linear keeps its weight, not its input;
a norm drops the normalized input its weight's gradient reads). So what a block saves depends on two facts read
off the spec's parameters: whether its input needs a gradient (something below it trains) and which of its
modules hold a trainable parameter. `flow_of(spec)` reads them; the block families turn them into bytes
(`Family.layer_with`, `Family.head_with`). When every parameter trains nothing changes (`Flow.full`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INDEX = re.compile(r"^(\d+)\.")


@dataclass(frozen=True)
class BlockFlow:
    """One block: `grad_in` — its input needs a gradient; `trains` — paths (relative to the block) of the modules
    that hold a trainable parameter, e.g. `self_attn.q_proj` or, under an adapter, `self_attn.q_proj.lora_A.default`;
    `full` — every parameter of the block trains."""

    grad_in: bool
    trains: frozenset[str]
    full: bool

    @property
    def dead(self) -> bool:
        """No gradient reaches or starts here: the block saves nothing."""
        return not self.grad_in and not self.trains

    def has(self, *modules: str) -> bool:
        """Whether any of `modules` (paths relative to the block) holds a trainable parameter, itself or inside
        (always, in a block whose every parameter trains)."""
        return self.full or any(t == m or t.startswith(m + ".") for m in modules for t in self.trains)

    @property
    def grad_out(self) -> bool:
        return self.grad_in or bool(self.trains)


@dataclass(frozen=True)
class Flow:
    """Every block's flow (bottom to top), and the parts after the blocks: whether the final norm's and the output
    head's weights train (`norm`, `head`; a head tied to a trainable embedding trains)."""

    blocks: tuple[BlockFlow, ...]
    norm: bool
    head: bool
    full: bool

    @property
    def grad_out(self) -> bool:
        """The last block's output needs a gradient."""
        return self.blocks[-1].grad_out if self.blocks else False


_FLOWS: dict[tuple, tuple[object, Flow]] = {}


def flow_of(spec) -> Flow:
    """The flow of `spec`'s model, memoised by the identity of its parameter tuple (the planner asks for the same
    model thousands of times; hashing the tuple itself cost more than computing the flow)."""
    m = spec.model
    key = (id(m.params), id(m.arch), m.n_layers, m.tie_embeddings, spec.task)
    hit = _FLOWS.get(key)
    if hit is None or hit[0][0] is not m.params or hit[0][1] is not m.arch:
        if len(_FLOWS) >= 256:
            _FLOWS.clear()
        hit = _FLOWS[key] = ((m.params, m.arch), _flow(spec))  # the references keep the ids from being reused
    return hit[1]


def _flow(spec) -> Flow:
    from memfit.memory.arch.names import is_embedding

    m = spec.model
    n = m.n_layers
    if all(p.trainable for p in m.params):
        full = BlockFlow(True, frozenset(), True)
        return Flow((full,) * n, True, True, True)
    trains: list[set[str]] = [set() for _ in range(n)]
    frozen = [False] * n
    embedding = norm = head = False
    for p in m.params:
        where = block_path(m, p.name)
        if where is not None:
            i, path = where
            if i < n:
                if p.trainable:
                    trains[i].add(path.rpartition(".")[0])
                else:
                    frozen[i] = True
        elif is_embedding(m, p.name):
            embedding |= p.trainable
            head |= p.trainable and m.tie_embeddings and p.numel == m.vocab * m.hidden and len(p.shape) == 2
        elif len(p.shape) >= 2:
            head |= p.trainable
        else:
            norm |= p.trainable
    blocks, grad = [], embedding
    for i in range(n):
        blocks.append(BlockFlow(grad, frozenset(trains[i]), not frozen[i]))
        grad = grad or bool(trains[i])
    return Flow(tuple(blocks), norm, head, False)


def block_path(m, name: str) -> tuple[int, str] | None:
    """(block index, the parameter's path inside the block) for a parameter of one of the blocks, else None."""
    from memfit.memory.arch.names import in_block

    if not in_block(m, name):
        return None
    prefix = m.arch.layer_prefix if m.arch is not None and m.arch.layer_prefix else None
    if prefix is not None:
        rest = f".{name}".split(f".{prefix}.", 1)[1]
    else:
        found = re.search(r"\.layers?\.(\d+\..*)$", f".{name}")
        if found is None:
            return None
        rest = found.group(1)
    index = _INDEX.match(rest)
    return (int(index.group(1)), rest[index.end():]) if index else None
