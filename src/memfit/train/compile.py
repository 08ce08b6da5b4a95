"""`train.compile: true` — torch.compile each decoder block of the model, after the techniques are applied.

Why per block and not the whole model: `nn.Module.compile()` on each block compiles in place, so the module tree,
parameter names and state_dict keys stay the same (checkpoints, resume, adapters' merge, `memfit report` see the
eager names); the blocks are identical, so inductor's compiled kernels are cached across them;
and what techniques put around the blocks — the chunked loss, embeddings, forward/backward wrappers, parameter
hooks of in-backward optimizers — runs eager, exactly as without compile. Inside a block, inductor fuses the
element-wise ops, so the tensors saved for backward are not the eager ones the activation estimate models
(`memfit.memory` counts eager autograd's saved tensors): the run's report carries `COMPILE_NOTE`.

Tried on the toy Llama (3 steps, `compile_backend: aot_eager`, losses against eager): checkpointing, offload
(saved-tensor hooks wrap the compiled graph's saved tensors), mesa, s2a, streambp, wta_crs, chunked_ce, lomo,
adamw layerwise (in-backward updates run from parameter hooks, outside the graphs), lora, qlora, int8 weights,
forward-grad, mezo and zo2 all train; equal to eager within 6e-6 (lora bit-equal after
main's 965696b seeded the techniques; before it lora/qlora differed by 1e-3/6e-3 through LoRA's init RNG; qlora
not rerun). wta_crs and zo2 graph-break (~50 breaks): they train, but gain little. So no technique is
refused; distributed runs are (FSDP2 wraps the blocks after this point; not built).
"""

from __future__ import annotations

import torch
from torch import nn

from memfit.errors import ConfigError

COMPILE_NOTE = ("train.compile: decoder blocks are compiled (inductor); the activation estimate models eager "
                "autograd's saved tensors, so the measured activations of a compiled run may differ from it")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder block in place (`nn.Module.compile`); returns how many were compiled."""
    from memfit.activations._common import decoder_layers

    try:
        layers = decoder_layers(model)
    except ConfigError as exc:
        raise ConfigError(f"train.compile: {exc}") from None
    # a fresh dynamo cache per built run: a process that builds several runs (benches, tests) would otherwise hit
    # the recompile limit on the shared block code and silently run later runs' blocks eager
    torch._dynamo.reset()
    # dynamo specializes each block on its `layer_idx` (one graph per block and grad mode): past the recompile
    # limit (8) the remaining blocks would run eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(layers))
    for block in layers:
        block.compile(backend=backend, dynamic=False)
    return len(layers)
