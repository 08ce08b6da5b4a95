"""`memfit bench pruning`: perplexity against size for SliceGPT, FLAP and LLM-Pruner (`memfit prune`).

The model is the weights suite's bench LM (`weights.lm_dir`: llama-1m trained by memfit's pretrain workload and
cached, or `MEMFIT_INFERENCE_MODEL`). Each method prunes a copy at sparsity 0, 0.1, 0.2, 0.3 and 0.5, calibrated on
32×128 tokens from the *start* of War and Peace (training text); the pruned folder is written, reloaded with plain
`transformers.AutoModelForCausalLM`, and that reloaded model is scored on held-out War and Peace windows (last 5 %).
`flap-nobias` is FLAP without its bias compensation (the ablation of the paper's Table 5); `flap-adaptive` is FLAP
as published, each layer cut to the width the global ranking gave it — no `LlamaConfig` describes that model, so it
is scored in memory and not written (a reference for what the uniform widths cost).

Rows: parameters and their bytes (fp32), safetensors file bytes, perplexity, KL divergence from the dense model's
next-token distribution (nats per token, same windows), prune seconds, the shapes chosen, and the largest logit
difference between the pruned model and its reload. `--only` takes a method (`flap`) or a row
(`flap-0.2`).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from memfit.bench.harness import BenchOptions, record_all

MIB = 2**20
SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.5)
METHODS = ("slicegpt", "flap", "flap-nobias", "flap-adaptive", "llm-pruner")


def _prune(model, method: str, sparsity: float, ids: torch.Tensor):
    from memfit.prune import prune_model

    if method == "flap-nobias":
        return prune_model(model, "flap", sparsity, ids, bias=False)
    if method == "flap-adaptive":
        return prune_model(model, "flap", sparsity, ids, uniform=False)
    return prune_model(model, method, sparsity, ids)


@torch.no_grad()
def _log_probs(model, windows: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([w])).logits[0].float().log_softmax(-1) for w in windows]


def _kl(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> float:
    """KL(dense ‖ pruned) per token, averaged over every position of every window."""
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(dense, pruned))
    return total / sum(p.shape[0] for p in dense)


def _shape(c) -> str:
    return f"h{c.hidden_size} heads{c.num_attention_heads} mlp{c.intermediate_size}"


def rows(opts: BenchOptions) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from memfit.bench.suites.inference import heldout_windows
    from memfit.bench.suites.weights import lm_dir, perplexity
    from memfit.generate import load_causal_lm
    from memfit.prune import max_logit_difference
    from memfit.prune.common import calibration_ids, count_params, param_bytes, save_pruned

    data_dir = Path(opts.data_dir)
    path = lm_dir(opts)
    dense, tokenizer = load_causal_lm(path, "sdpa")
    dense.float().eval()
    windows = heldout_windows(tokenizer, data_dir, 16 if opts.quick else 48, 128)  # the LM was trained at block 128
    text = (data_dir / "warpeace/input.txt").read_text(encoding="utf-8")
    ids = calibration_ids(tokenizer, text[:400_000], 32, 128)
    base_ppl, base_params = perplexity(dense, windows), count_params(dense)
    ref = _log_probs(dense, windows)
    out = [{"method": "dense", "sparsity": 0.0, "model": path.parent.name, "params": base_params,
            "params_vs_dense": 1.0, "weight_mib": param_bytes(dense) / MIB, "file_mib": None, "ppl": base_ppl,
            "ppl_vs_dense": 1.0, "kl_vs_dense": 0.0, "prune_s": 0.0,
            "shape": _shape(dense.config), "reload_diff": None}]
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            for s in SPARSITIES:
                if not (opts.wants(method) or opts.wants(f"{method}-{s}")):
                    continue
                t0 = time.perf_counter()
                result = _prune(copy.deepcopy(dense), method, s, ids)
                prune_s = time.perf_counter() - t0
                folder = Path(tmp) / f"{method}-{s}"
                if method == "flap-adaptive":
                    scored, diff, file_mib = result.model, None, None
                    d = result.details
                    shape = f"heads-{d['head_groups_removed_per_layer']} mlp-{d['channels_removed_per_layer']}"
                else:
                    save_pruned(result, tokenizer, folder, source=str(path))
                    diff = max_logit_difference(result.model, folder, ids[:1])
                    scored = AutoModelForCausalLM.from_pretrained(folder).eval()
                    file_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MIB
                    shape = _shape(scored.config)
                ppl = perplexity(scored, windows)
                out.append({"method": method, "sparsity": s, "params": count_params(scored),
                            "params_vs_dense": count_params(scored) / base_params,
                            "weight_mib": param_bytes(scored) / MIB, "file_mib": file_mib,
                            "ppl": ppl, "ppl_vs_dense": ppl / base_ppl,
                            "kl_vs_dense": _kl(ref, _log_probs(scored, windows)), "prune_s": prune_s,
                            "shape": shape, "reload_diff": diff})
    return out


def run(opts: BenchOptions) -> list[dict]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out: list[dict] = []
    record_all(opts, out, rows(opts))
    return out
