"""Structured pruning: a genuinely smaller model (fewer heads, MLP channels or hidden dimensions), written as a plain
Hugging Face folder that `transformers.AutoModelForCausalLM.from_pretrained` loads without memfit.

Layout: `layout.py` (each decoder family's module names, fusions, biases and norm conventions) ← `common.py`
(calibration, cutting, config, writing the folder) ← `slicegpt.py` (SliceGPT, delete residual directions after a PCA
rotation), `flap.py` (FLAP, fluctuation metric + bias compensation), `llm_pruner.py` (LLM-Pruner, Taylor importance
of dependency groups). Families: Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3; OPT and GPT-NeoX (MLP channels only).

API: `prune_model(model, method, sparsity, calibration_ids)` prunes a loaded model in place; `prune(model_dir,
method, sparsity, calib, out)` is `memfit prune`: load, calibrate, prune, write, reload with plain transformers and
check the logits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memfit.errors import ConfigError, ModelError
from memfit.prune.common import (
    DEFAULT_LENGTH,
    DEFAULT_SAMPLES,
    PruneResult,
    calibration_ids,
    check_output,
    count_params,
    decoder_layers,
    save_pruned,
)
from memfit.prune.flap import flap
from memfit.prune.layout import layout_of
from memfit.prune.llm_pruner import llm_pruner
from memfit.prune.slicegpt import slicegpt

METHODS: dict[str, tuple[Callable[..., dict], str]] = {
    # name: (function(model, ids, sparsity, **options) -> details, what --sparsity means)
    "slicegpt": (slicegpt, "the fraction of the hidden size to delete"),
    "flap": (flap, "the fraction of the layers' parameters to remove"),
    "llm-pruner": (llm_pruner, "the fraction of each layer's heads and MLP channels to remove"),
}
DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "assets" / "shakespeare.txt"


def prune_model(model, method: str, sparsity: float, ids: torch.Tensor, **options) -> PruneResult:
    """Prune `model` (a transformers causal LM of a family in `layout.LAYOUTS`) in place with `method` on
    calibration `ids` (`options`: the method's own, e.g. FLAP's `bias=False`)."""
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method '{method}'; choose one of: {', '.join(METHODS)}")
    fn, meaning = METHODS[method]
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{method} --sparsity is {meaning}, in [0, 1); got {sparsity}")
    decoder_layers(model)
    before, t0 = count_params(model), time.perf_counter()
    details = fn(model.eval(), ids, sparsity, **options)
    return PruneResult(model, method, sparsity, before, count_params(model), time.perf_counter() - t0, details)


@torch.no_grad()
def max_logit_difference(model, folder: str | os.PathLike, ids: torch.Tensor) -> float:
    """Largest |logit difference| between `model` and the folder reloaded by plain transformers, on `ids`."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval()
    if sum(p.numel() for p in reloaded.parameters()) != sum(p.numel() for p in model.parameters()):
        raise ModelError(f"{folder} reloads with a different parameter count than the pruned model")
    a = model(input_ids=ids, use_cache=False).logits.float()
    b = reloaded(input_ids=ids, use_cache=False).logits.float()
    return float((a - b).abs().max())


def prune(model_dir: str | os.PathLike, method: str, sparsity: float, out: str | os.PathLike, *,
          calib: str | os.PathLike | None = None, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH,
          overwrite: bool = False, verify: bool = True) -> tuple[PruneResult, float | None]:
    """`memfit prune`: (the result, the largest logit difference after reloading the folder, None if not
    verified). The model keeps the dtype it is stored in (statistics and rotations are computed in float64);
    `calib` is a UTF-8 text file (default: the bundled Shakespeare)."""
    from memfit.data.io import existing_file, read_utf8
    from memfit.generate import load_causal_lm
    from memfit.progress import note

    if method not in METHODS:
        raise ConfigError(f"unknown pruning method '{method}'; choose one of: {', '.join(METHODS)}")
    out = Path(out)
    check_output(out, overwrite)
    text = read_utf8(existing_file(calib or DEFAULT_CALIB, "calibration text", "--calib"), "calibration text")
    model, tokenizer = load_causal_lm(model_dir, "sdpa")
    layout_of(model)  # an unsupported architecture is refused before anything is printed
    ids = calibration_ids(tokenizer, text, samples, length)
    note(f"pruning {model_dir} with {method} at sparsity {sparsity} on {ids.shape[0]}×{ids.shape[1]} calibration "
         f"tokens")
    result = prune_model(model, method, sparsity, ids)
    save_pruned(result, tokenizer, out, source=str(model_dir), overwrite=overwrite)
    diff = None
    if verify:
        diff = max_logit_difference(result.model, out, ids[:1])
        with torch.no_grad():
            scale = float(result.model(input_ids=ids[:1], use_cache=False).logits.abs().max())
        if diff > 1e-4 * max(1.0, scale):
            raise ModelError(f"{out} reloaded by transformers gives logits {diff:.3g} away from the pruned model; "
                             f"the config does not describe it (please report)")
    return result, diff
