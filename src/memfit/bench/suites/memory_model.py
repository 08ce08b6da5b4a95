"""How close the analytic memory model (`memfit.memory.estimate`) is to what the meter measures.

For each model family, attention implementation, precision and sequence length: one forward + backward on random
tokens under `MemoryMeter`; rows give measured/estimated ratios for activations (alive after the forward),
the temporaries peak, and the step's tensor peak (`step_peak`), next to the naive sum of category peaks.

`--only families`: the Llama/BERT/MiniLM rows; `--only architectures`: every block family of `memory/arch/`,
tiny from config (`ARCHITECTURES`), in both precisions and attention implementations (a minute or two);
`--only process`: predicted vs measured *process* peaks, each configuration in a fresh process
(`memfit.bench.process_grid`).
"""

from __future__ import annotations

import itertools
import torch

from memfit.bench.harness import BenchOptions, record_all
from memfit.progress import note
from memfit.memory.estimate import baseline, step_peak
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec

MiB = 2**20


def _random_batch(model, task: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids}
    n = model.config.num_labels
    labels = torch.randint(0, n, (batch,) if task == "seq_cls" else (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def measure_row(name: str, model, task: str, attn: str, precision: str, batch: int, seq: int) -> dict:
    """One forward + backward of `model` in `precision` (a `memory/precision.py` name; -true casts the weights to
    their storage dtype first) against the baseline estimate."""
    from memfit.memory.precision import precision as policy_of
    from memfit.memory.spec import dtype_name

    policy = policy_of(precision)
    model.set_attn_implementation(attn)
    model.to(policy.storage_dtype).train()
    spec = RunSpec.from_model(model, batch=batch, seq=seq, task=task, param_dtype=dtype_name(policy.storage_dtype),
                              compute_dtype=policy.compute, attn_impl=attn, precision=policy.name)
    est = baseline(spec)
    data = _random_batch(model, task, batch, seq)
    meter = MemoryMeter(model)
    amp = policy.autocast_context(torch.device("cpu"))
    with meter.region():
        with amp:
            loss = model(**data).loss
        after_forward = meter.current().activations
        loss.backward()
        del loss
    report = meter.report()
    model.zero_grad(set_to_none=True)
    return {
        "model": name, "task": task, "attn": attn, "precision": precision, "batch": batch, "seq": seq,
        "act_measured_mib": round(after_forward / MiB, 2), "act_estimate_mib": round(est.activations / MiB, 2),
        "act_ratio": round(after_forward / est.activations, 4),
        "temp_ratio": round(report.category_peaks.temporaries / est.temporaries, 3),
        "step_peak_ratio": round(report.tensor_peak / step_peak(spec, est), 3),
        "sum_of_categories_ratio": round(report.tensor_peak / est.total, 3),
    }


def _tiny_bert(task: str):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512, num_labels=3)
    torch.manual_seed(0)
    return (BertForSequenceClassification if task == "seq_cls" else BertForTokenClassification)(cfg)


TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
            num_labels=3)
MLP = dict(intermediate_size=128)  # for the configs that name their MLP width so (GPT-2, OPT, Falcon do not)
_DEBERTA_V3 = dict(relative_attention=True, position_buckets=16, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                   norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...], dict]] = {
    # name: (model_type, tasks, config fields over TINY) — each a block family's variant worth a row
    "llama": ("llama", ("causal_lm",), {**MLP, "num_key_value_heads": 2}),
    "mistral-window": ("mistral", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "sliding_window": 16}),
    "qwen2": ("qwen2", ("causal_lm",), {**MLP, "num_key_value_heads": 2}),
    "qwen3": ("qwen3", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "head_dim": 32}),
    "gemma": ("gemma", ("causal_lm",), {**MLP, "num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": ("gemma2", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "head_dim": 32, "sliding_window": 16}),
    "phi": ("phi", ("causal_lm",), {**MLP, "resid_pdrop": 0.1, "embd_pdrop": 0.1}),
    "phi3": ("phi3", ("causal_lm",), {**MLP, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt-neox": ("gpt_neox", ("causal_lm",), MLP),
    "gpt-neox-sequential": ("gpt_neox", ("causal_lm",), {**MLP, "use_parallel_residual": False, "hidden_dropout": 0.1}),
    "opt": ("opt", ("causal_lm",), {"ffn_dim": 256, "word_embed_proj_dim": 64}),
    "gpt2": ("gpt2", ("causal_lm",), {}),
    "gpt2-no-dropout": ("gpt2", ("causal_lm",), {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "falcon": ("falcon", ("causal_lm",), {}),
    "falcon-new": ("falcon", ("causal_lm",), {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "mixtral": ("mixtral", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "num_local_experts": 4,
                                          "num_experts_per_tok": 2}),
    "qwen2-moe": ("qwen2_moe", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "num_experts": 4,
                                              "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                              "shared_expert_intermediate_size": 64}),
    "qwen3-moe": ("qwen3_moe", ("causal_lm",), {**MLP, "num_key_value_heads": 2, "num_experts": 4,
                                              "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "stablelm": ("stablelm", ("causal_lm",), {**MLP, "num_key_value_heads": 2}),
    # read by a family without a test of their own before: Llama blocks (Granite's multipliers, OLMo's
    # parameter-free LayerNorm), experts (OLMoE), BERT blocks (ELECTRA's narrower embedding, XLM-RoBERTa)
    "granite": ("granite", ("causal_lm",), {**MLP, "num_key_value_heads": 2}),
    "olmo": ("olmo", ("causal_lm",), {**MLP, "num_key_value_heads": 2}),
    "olmoe": ("olmoe", ("causal_lm",), {**MLP, "num_experts": 4, "num_experts_per_tok": 2}),
    "bert": ("bert", ("seq_cls", "token_cls"), MLP),
    "roberta": ("roberta", ("seq_cls", "token_cls"), MLP),
    "deberta-v2": ("deberta-v2", ("seq_cls", "token_cls"), MLP),
    "deberta-v3": ("deberta-v2", ("seq_cls", "token_cls"), {**MLP, **_DEBERTA_V3}),
    "electra": ("electra", ("seq_cls",), {**MLP, "embedding_size": 64}),
    "xlm-roberta": ("xlm-roberta", ("seq_cls",), MLP),
}


def tiny_model(name: str, task: str, attn: str):
    """A randomly initialised tiny model of `ARCHITECTURES[name]` for `task`, training mode, `attn` attention."""
    import transformers

    model_type, _, fields = ARCHITECTURES[name]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **fields})
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "seq_cls": transformers.AutoModelForSequenceClassification,
            "token_cls": transformers.AutoModelForTokenClassification}[task]
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation=attn).train()


def supports(name: str, attn: str) -> bool:
    """Whether transformers runs the architecture with `attn` (Gemma2 and DeBERTa are eager only)."""
    import transformers

    model_type = ARCHITECTURES[name][0]
    cls = transformers.AutoModelForCausalLM if model_type != "deberta-v2" else transformers.AutoModel
    arch = cls._model_mapping[transformers.AutoConfig.for_model(model_type).__class__]
    return attn == "eager" or bool(getattr(arch, "_supports_sdpa", False))


def architecture_rows(seq: int = 32) -> list[dict]:
    rows = []
    for name, (_, tasks, _) in ARCHITECTURES.items():
        for task, attn, precision in itertools.product(tasks, ["sdpa", "eager"], ["fp32", "bf16"]):
            if supports(name, attn):
                rows.append(measure_row(name, tiny_model(name, task, attn), task, attn, precision, 2, seq))
    return rows


def run(opts: BenchOptions) -> list[dict]:
    rows: list[dict] = []
    if opts.wants("architectures"):
        record_all(opts, rows, architecture_rows())
    if opts.wants("precision"):
        record_all(opts, rows, precision_rows(opts))
    if opts.wants("families"):
        record_all(opts, rows, _family_rows(opts))
    if opts.wants("process"):
        from memfit.bench import process_grid

        grid_rows = process_grid.rows(opts)
        record_all(opts, rows, grid_rows + [{"model": "summary", **process_grid.summary(grid_rows)}])
    return rows


def precision_rows(opts: BenchOptions) -> list[dict]:
    """Technique × precision on llama-tiny, run for real (`bench/technique_matrix.py`); then architecture ×
    precision for a full fine-tune's forward + backward, weights stored as each precision stores them (quick:
    one attention implementation, the decoders that differ most)."""
    from memfit.bench.technique_matrix import matrix_rows, totals

    rows = matrix_rows(opts.data_dir)
    note(f"technique x precision: {totals(rows)}")
    names = ["llama", "gemma2", "gpt2", "mixtral", "bert"] if opts.quick else list(ARCHITECTURES)
    for name in names:
        tasks = ARCHITECTURES[name][1][:1]
        attn = "sdpa" if supports(name, "sdpa") else "eager"
        for task, policy in itertools.product(tasks, ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")):
            row = measure_row(name, tiny_model(name, task, attn), task, attn, policy, 2, 32)
            rows.append({"technique": "architecture", **row})
    return rows


def _family_rows(opts: BenchOptions) -> list[dict]:
    from memfit.models import build_llama, load_model

    rows: list[dict] = []
    grid = list(itertools.product(["sdpa", "eager"], ["fp32", "bf16"]))
    seqs = [128] if opts.quick else [128, 256]
    for (attn, precision), seq in itertools.product(grid, [64, 256]):
        rows.append(measure_row("llama-tiny", build_llama("llama-tiny", 256), "causal_lm", attn, precision, 2, seq))
        for task in ("seq_cls", "token_cls"):
            rows.append(measure_row("bert-tiny", _tiny_bert(task), task, attn, precision, 2, seq))
    llama = build_llama("llama-20m", 8000)
    for (attn, precision), seq in itertools.product(grid, seqs):
        rows.append(measure_row("llama-20m", llama, "causal_lm", attn, precision, 2, seq))
    for task in ("seq_cls", "token_cls"):
        minilm = load_model("minilm-l6", task, num_labels=3 if task == "seq_cls" else 9).model
        for (attn, precision), seq in itertools.product(grid, seqs):
            if task == "token_cls" and (attn, precision) != ("sdpa", "fp32"):
                continue
            rows.append(measure_row("minilm-l6", minilm, task, attn, precision, 4, seq))
    return rows
