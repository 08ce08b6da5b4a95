"""What a block family's memory formulas need to know about a model, beyond `ModelShape`'s numbers.

An `Arch` is pure data read once from a transformers config and the (meta-device) modules; estimates stay pure
functions of a `RunSpec`. `Family` is the protocol each block family implements in its own file: recognise a
model (`describe`), then say what one block and the parts outside the blocks save for backward, and what one
block's backward holds transiently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memfit.errors import ModelError

if TYPE_CHECKING:  # (BlockFlow, Flow in annotations: memory/arch/flow.py, which imports this package)
    from torch import nn


class UnsupportedArchitecture(ModelError):
    """memfit has no memory model for this architecture (or one of its features)."""


@dataclass(frozen=True)
class Saves:
    """What an elementwise module (a norm or an activation) saves for backward per call, read off autograd by
    `probe.py`. Per element of its input: the input itself (`input`), an fp32 copy of it (`upcast`: the input
    itself when it is already fp32), other tensors in the input's dtype (`elem`) or in fp32 (`elem_fp32`);
    per row of the input, fp32 values (`row_fp32`: a norm's statistics); per channel, fp32 values
    (`width_fp32`: Gemma's `1 + weight`). `output`: one of the `elem` tensors is the module's result (ReLU), so
    a consumer that saves the result adds nothing. `backward`: input-sized tensors alive at once inside its
    backward, its input's gradient included (an activation written as several ops makes more than one)."""

    input: bool = False
    upcast: bool = False
    elem: int = 0
    elem_fp32: int = 0
    row_fp32: int = 0
    width_fp32: int = 0
    output: bool = False
    backward: int = 1
    frozen: Saves | None = None  # what it saves with its weights frozen (None: the same)
    leaf: Saves | None = None  # what it saves when its input needs no gradient and its weights train

    def when(self, grad_in: bool, weight_grad: bool) -> Saves | None:
        """What a module with weights saves when its input needs a gradient (`grad_in`) and/or its weights train
        (`weight_grad`): None when neither (nothing is recorded)."""
        if grad_in and weight_grad:
            return self
        if grad_in:
            return self.frozen or self
        if weight_grad:
            return self.leaf or self
        return None

    def bytes(self, rows: int, width: int, input_bytes: int, input_saved: bool = False) -> int:
        """Bytes for an input of `rows` × `width` elements of `input_bytes` each. `input_saved`: the input
        tensor is already saved by another op (it is then not counted again)."""
        elem = self.elem * input_bytes + self.elem_fp32 * 4
        if not input_saved:
            elem += input_bytes if self.input else 0
        if self.upcast and not (input_saved and input_bytes == 4):
            elem += 4
        return rows * width * elem + rows * 4 * self.row_fp32 + width * 4 * self.width_fp32


RMS_NORM = Saves(upcast=True, elem=1, row_fp32=1, frozen=Saves(upcast=True, row_fp32=1), leaf=Saves(elem=1))
"""Llama's RMSNorm: the fp32 input for `pow`, the per-row rsqrt, the normalized input (in the input's dtype),
which only the weight's gradient needs; an input that needs no gradient: only the normalized input."""
LAYER_NORM = Saves(input=True, row_fp32=2)
"""`nn.LayerNorm`: input, mean and rstd per row."""
SILU = Saves(input=True)
GELU = Saves(input=True)


@dataclass(frozen=True)
class Arch:
    """Facts one block family's formulas read. Defaults describe Llama; every family fills what it uses.

    Dropout probabilities here are the config's; `spec.extra["attn_dropout"]` / `["hidden_dropout"]` override
    them (the run's own settings). `hidden_dropout` is every non-attention dropout (residual branches, MLP);
    `embd_dropout` the one after the embeddings.
    """

    family: str
    model_type: str = ""
    norm: Saves = RMS_NORM
    act: Saves = SILU
    gated: bool = True  # act(gate) · up
    fused_qkv: bool = False  # one projection makes q, k and v (GPT-2 c_attn, NeoX/Falcon query_key_value)
    fused_gate_up: bool = False  # one projection makes gate and up (Phi-3, MoE experts)
    parallel: bool = False  # attention and MLP both read the block's input (NeoX, Phi, Falcon)
    rotary_dim: int = 0  # rotated channels per head; 0: no rotary embedding
    relaid_output: bool = False  # SDPA's output is copied into a new (B, S, H·D) tensor for the output projection
    qk_norm: bool = False  # a norm over each head's q and k (Qwen3)
    attn_softcap: float = 0.0  # tanh soft-capping of attention scores (Gemma2)
    final_softcap: float = 0.0  # tanh soft-capping of the logits (Gemma2)
    sliding_window: int = 0  # tokens a sliding-window layer attends to; 0: none
    sliding_layers: int = 0  # how many of the blocks use the window
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    embd_dropout: float = 0.0
    experts: int = 0  # routed experts per MoE layer (all held); 0: dense MLP
    top_k: int = 0  # experts each token is routed to
    shared_expert: int = 0  # intermediate size of the always-on expert (Qwen-MoE); 0: none
    norm_topk: bool = False  # top-k routing weights renormalized (Mixtral)
    layer_prefix: str = ""  # module path of the blocks' list: parameters under it belong to the blocks
    embedding_modules: tuple[str, ...] = ()  # module paths of the input embeddings (tables gathered by index)
    options: tuple[tuple[str, Any], ...] = field(default=())  # family-specific facts

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


class Family:
    """One block family. Subclasses live one per file and are listed in `arch/__init__.py`'s `FAMILIES`."""

    name = ""
    tasks: tuple[str, ...] = ("causal_lm",)

    def describe(self, config: Any, model: nn.Module, block: nn.Module, prefix: str) -> tuple[Arch, dict] | None:
        """(facts, `ModelShape` numbers) when `block` (the first of the model's blocks, named `prefix`.0) is
        one of this family's, else None. Raise `UnsupportedArchitecture` for a feature this family lacks."""
        raise NotImplementedError

    def check_task(self, spec: RunSpec, model_type: str) -> None:
        if spec.task not in self.tasks:
            raise UnsupportedArchitecture(f"memfit models {model_type or self.name} for "
                                          f"{' and '.join(self.tasks)}, not for task '{spec.task}'")

    def layer(self, spec: RunSpec) -> dict[str, int]:
        """Bytes one block saves for backward: `attention`, `mlp`, `norms` (dropout masks in their branch)."""
        raise NotImplementedError

    def head(self, spec: RunSpec) -> dict[str, int]:
        """Bytes saved outside the blocks: `embeddings`, `final_norm`, `head`, `loss`, `logits`."""
        raise NotImplementedError

    def layer_with(self, spec: RunSpec, flow: BlockFlow) -> dict[str, int]:
        """What one block saves where part of the model is frozen (`arch/flow.py`): nothing when no gradient
        reaches or starts in it; else, here, the block of a full fine-tune (an upper bound: a family that models
        frozen weights overrides this)."""
        if flow.dead:
            return dict.fromkeys(self.layer(spec), 0)
        return self.layer(spec)

    def head_with(self, spec: RunSpec, flow: Flow) -> dict[str, int]:
        """What the parts outside the blocks save where part of the model is frozen (here: as in a full
        fine-tune, an upper bound)."""
        return self.head(spec)

    def output_held(self, spec: RunSpec) -> int:
        """Bytes the model's output holds until it is dropped, beyond what backward saves (e.g. a KV cache whose
        tensors are not the ones the attention saved)."""
        return 0

    def cache_saved(self, spec: RunSpec) -> int:
        """Bytes of one block's KV-cache entries that are the very tensors its attention saved (so free beside
        them), held by the forward's output until the loss is computed: a technique that re-stores saved tensors
        keeps these in full on top of its copies."""
        return 0

    def kept_inputs(self, spec: RunSpec) -> tuple[str, ...]:
        """Paths (inside a block) of the projections whose input another op saves anyway (e.g. the attention
        kernel's own output, read by the output projection): an adapter that casts its input to a copy of its
        own keeps that copy on top."""
        return ()

    def input_grad(self, flow: BlockFlow, path: str) -> bool:
        """Whether the input of the module at `path` (inside a block) needs a gradient, so that under autocast its
        weight's cast copy is saved: here, in any block a gradient reaches or starts in."""
        return not flow.dead

    def temporaries(self, spec: RunSpec) -> tuple[int, int]:
        """(MLP, attention) transients inside one block's backward."""
        raise NotImplementedError
