"""`memfit bench fewer-params`: train fewer parameters on finetune-cls (MiniLM-L6, SST-2) and finetune-ner
(CoNLL-2003), same steps and seed: full fine-tuning (AdamW), LoRA r=8/16, DoRA, LISA (1 and 2 layers), LISA
without freeing state (LMFlow's behaviour), OwLore, IST, BAdam, the side networks LST, UniPT and SHERL, MEFT's
reversible adapters, SwitchLoRA, SketchTune, plus QLoRA/PEQA where registered.
Rows carry quality, trainable parameters, peak memory by category and tokens/s; the LISA/LoRA peak ratio is
added as a row field (`peak_vs_lora_r8`).
"""

from __future__ import annotations

from typing import Any

from memfit.bench.harness import BenchOptions, record_partial, train_row
from memfit.bench.workloads import workload
from memfit.techniques.registry import SLOTS

# method -> (adapter spec or None, learning rate). Adapters train few weights and take larger steps.
METHODS: dict[str, tuple[dict[str, Any] | None, float]] = {
    "full-ft": (None, 1e-4),
    "lora-r8": ({"name": "lora", "r": 8, "alpha": 16}, 1e-3),
    "lora-r16": ({"name": "lora", "r": 16, "alpha": 32}, 1e-3),
    "dora-r8": ({"name": "dora", "r": 8, "alpha": 16}, 1e-3),
    "qlora-r8": ({"name": "qlora", "r": 8, "alpha": 16}, 1e-3),
    "peqa": ({"name": "peqa"}, 1e-3),
    "lisa-1": ({"name": "lisa", "layers": 1, "interval": 2}, 1e-4),
    "lisa-2": ({"name": "lisa", "layers": 2, "interval": 2}, 1e-4),
    "lisa-2-lmflow": ({"name": "lisa", "layers": 2, "interval": 2, "free_state": False}, 1e-4),
    "owlore-2": ({"name": "owlore", "layers": 2, "interval": 2}, 1e-4),
    "ist-r8": ({"name": "ist", "r": 8, "alpha": 16, "layers": 3, "interval": 5, "update_every": 5}, 1e-3),
    "badam": ({"name": "badam", "interval": 25}, 1e-4),  # one descending sweep over MiniLM's 6 blocks in 150 steps
    "lst": ({"name": "lst", "reduction": 8}, 1e-3),
    "unipt": ({"name": "unipt", "reduction": 8}, 1e-3),
    "sherl": ({"name": "sherl", "late": 1, "reduction": 8}, 1e-3),  # 1e-4 (full FT's) stayed at chance in 60 steps
    "slimfit-0.5": ({"name": "slimfit", "freeze_ratio": 0.5, "interval": 10}, 1e-4),
    # + SlimFit's pruning: frozen layers keep 4-bit codes of their saved tensors and 10 % of their attention
    # probabilities (a bitmap of their places)
    "slimfit-0.5-q4p10": ({"name": "slimfit", "freeze_ratio": 0.5, "interval": 10, "bits": 4, "keep": 0.1}, 1e-4),
    "meft": ({"name": "meft", "reduction": 8}, 1e-3),
    "switchlora-r8": ({"name": "switchlora", "r": 8, "alpha": 16, "switch_rate": 0.1, "decay_steps": 100}, 1e-3),
    "sketchtune-4bit": ({"name": "sketchtune", "bits": 4}, 1e-3),  # as PEQA's scales; 1e-4 stayed at chance
}

# what each paper claims for its method (the table prints it beside the measured row)
PAPER_CLAIMS: dict[str, str] = {
    "lst": "69% less memory than full fine-tuning (T5, GLUE), 2.7x the saving of adapters/LoRA",
    "unipt": "parallel side network over all layers: less training memory than LST, higher accuracy",
    "sherl": "early-route aggregation + late layers: higher accuracy than LST/UniPT at similar memory",
    "meft": "activation memory down by up to 84% of full fine-tuning, accuracy close to it (GLUE, QA)",
    "switchlora-r8": "LoRA's memory (+ a frozen candidate pool); perplexity near full-rank training, below LoRA's",
    "sketchtune-4bit": "a sketched base several times smaller than the model, accuracy above LoRA-family baselines",
    "slimfit-0.5": "up to 2.2x less memory on GLUE with BERT, < 0.4 points accuracy drop (freezing up to 95% of layers)",
    "slimfit-0.5-q4p10": "up to 2.2x less memory on GLUE with BERT, < 0.4 points accuracy drop (freezing up to 95% of "
                         "layers; 4-bit quantized and pruned activations of frozen layers)",
}


WORKLOADS = ("finetune-cls", "finetune-ner")
QUICK = (6, 8, 32)  # quick mode: steps, batch, tokens
QUICK_EVAL_BATCHES = 2
EVAL_BATCHES = {"finetune-cls": 55, "finetune-ner": 64}  # all 872 SST-2 dev sentences; 1,024 CoNLL valid ones


def run(opts: BenchOptions) -> list[dict]:
    # quick: a smoke run small enough for a shared 2-core machine (batch 8, 32 tokens, 6 steps); full: the
    # recipes' batch and length for 150 steps, long enough for the quality ordering to show (~1 min per row)
    steps, batch, seq = QUICK if opts.quick else (150, None, None)
    rows: list[dict] = []
    workloads = [o for o in opts.only if o in WORKLOADS] or list(WORKLOADS)
    methods = [o for o in opts.only if o not in WORKLOADS] or list(METHODS)  # --only takes both kinds
    for wl in workloads:
        lora_peak = None
        for method, (adapter, lr) in METHODS.items():
            if method not in methods or (adapter and adapter["name"] not in SLOTS["adapter"]):
                continue
            train = {"batch_size": batch} if batch else {}
            recipe = workload(wl, opts.data_dir, steps=steps, warmup_steps=max(1, steps // 10), measure_steps=3,
                              eval_every=0, eval_batches=QUICK_EVAL_BATCHES if opts.quick else EVAL_BATCHES[wl], **train)
            if seq:
                recipe["data"]["max_length"] = seq
            recipe["optimizer"] = {**recipe["optimizer"], "lr": lr}
            if method.startswith("owlore") and "galore" in SLOTS["optimizer"]:
                recipe["optimizer"] = {"name": "galore", "lr": lr, "rank": 64, "scale": 4.0}  # GaLore fine-tuning scale
            if adapter:
                recipe["adapter"] = adapter
            try:
                row = train_row(recipe, method, opts, workload=wl)
            except Exception as exc:  # noqa: BLE001 - one failing method should not sink the suite; say why in the table
                row = {"workload": wl, "method": method, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                record_partial(opts, row)
            peak = sum(v for k, v in row.items() if k.startswith("peak_") and k != "peak_total" and v) or None
            row["peak_tensor_total"] = peak
            if method in PAPER_CLAIMS:
                row["paper_claim"] = PAPER_CLAIMS[method]
            if method == "lora-r8":
                lora_peak = peak
            if lora_peak and peak:
                row["peak_vs_lora_r8"] = round(peak / lora_peak, 3)
            rows.append(row)
    return rows
