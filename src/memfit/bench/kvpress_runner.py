"""Score NVIDIA kvpress presses on the same model and text as memfit's `inference` suite.

kvpress pins an older `transformers` than memfit, so this file imports nothing from memfit and runs under kvpress's
own virtual environment as a subprocess:  `<kvpress-venv>/bin/python kvpress_runner.py job.json`  prints JSON rows.

Protocol (the same as memfit's "context" rows): prefill the context inside `with press(model)` — kvpress compresses
once, after the whole context went through — then score the continuation in one teacher-forced forward on the
compressed cache. `job.json`: {"model": dir, "windows": [[context ids], [continuation ids]] list, "ratios": [kept
fractions], "presses": [names]}.
"""

from __future__ import annotations

import json
import math
import sys
import time


def _press(name: str, compression: float):
    import kvpress

    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=compression, n_sink=4)
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=compression, window_size=16, kernel_size=7)
    if name == "pyramid":
        return kvpress.PyramidKVPress(compression_ratio=compression, window_size=16, kernel_size=7)
    if name == "observed_attention":
        return kvpress.ObservedAttentionPress(compression_ratio=compression)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=compression)
    raise ValueError(f"unknown press {name}")


def main(job_path: str) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(1)
    with open(job_path) as f:
        job = json.load(f)
    rows = []
    models = {}
    for name in job["presses"]:
        attn = "eager" if name == "observed_attention" else "sdpa"
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(job["model"], attn_implementation=attn).eval()
        model = models[attn]
        for ratio in job["ratios"]:
            nll, count, kept, start = 0.0, 0, [], time.perf_counter()
            scored_by = "one forward"
            for context, continuation in job["windows"]:
                ctx = torch.tensor([context])
                cont = torch.tensor([continuation])
                cache = DynamicCache()
                with torch.no_grad():
                    if ratio < 1.0:
                        with _press(name, 1.0 - ratio)(model):
                            model(ctx, past_key_values=cache)
                    else:
                        model(ctx, past_key_values=cache)
                    kept.append(cache.get_seq_length())
                    # both sides score continuation[1:] given the (compressed) context and continuation[:-1]
                    positions = torch.arange(ctx.shape[1], ctx.shape[1] + cont.shape[1])[None]  # true positions
                    if len({layer.keys.shape[-2] for layer in cache.layers}) == 1:
                        logits = model(cont, past_key_values=cache, position_ids=positions).logits[0, :-1]
                    else:
                        # per-layer lengths (PyramidKV): transformers builds one mask for all layers, which only
                        # works for single-token steps, so the continuation is scored token by token
                        scored_by = "token by token"
                        logits = torch.cat([model(cont[:, i:i + 1], past_key_values=cache,
                                                  position_ids=positions[:, i:i + 1]).logits[0]
                                            for i in range(cont.shape[1] - 1)])
                    nll += torch.nn.functional.cross_entropy(logits.float(), cont[0, 1:], reduction="sum").item()
                    count += cont.shape[1] - 1
            rows.append({"press": name, "ratio": ratio, "ppl": math.exp(nll / count),
                         "kept_tokens": sum(kept) / len(kept), "seconds": time.perf_counter() - start,
                         "scored_by": scored_by,
                         "transformers": transformers.__version__})
    if job.get("peak_len"):
        rows += prefill_peaks(models.get("sdpa") or AutoModelForCausalLM.from_pretrained(job["model"]).eval(),
                              job["peak_len"], job.get("peak_ratio", 0.1))
    print(json.dumps(rows))


def prefill_peaks(model, length: int, ratio: float) -> list[dict]:
    """Tensor peak of one prefill (PyTorch's MemTracker, as memfit's MemoryMeter), plain and with SnapKV."""
    import torch
    import transformers
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in ("none", "snapkv"):
        cache = DynamicCache()
        tracker = MemTracker()
        tracker.track_external(model)
        with torch.no_grad(), tracker:
            # the base model only (no LM head), as kvpress's pipeline prefills the context
            if name == "none":
                model.model(ids, past_key_values=cache)
            else:
                with _press("snapkv", 1.0 - ratio)(model):
                    model.model(ids, past_key_values=cache)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
        peak = sum(v for k, v in snap.items() if isinstance(k, _MemRefType))
        rows.append({"press": f"prefill-peak:{name}", "ratio": ratio if name != "none" else 1.0,
                     "prefill_len": length, "tensor_peak": peak,
                     "kept_tokens": cache.get_seq_length(), "transformers": transformers.__version__})
    return rows


if __name__ == "__main__":
    main(sys.argv[1])
