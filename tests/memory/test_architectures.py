"""Every block family of `memory/arch/` against the meter: a tiny model of each architecture, built from its config,
one forward + backward in fp32 and under bf16 autocast, SDPA and eager attention (where transformers runs them).

Bounds (measured ratios: `memfit bench memory-model --only architectures`, docs/architecture.md):
- parameters and gradients exact; activations alive after the forward within 2 %;
- temporaries: never under-estimated by more than 8 % for causal LMs (in fp32 the LM head's input gradient,
  t·H·4, is not in the inherited head formula) and 13 % for encoders (BERT's block formula), DeBERTa's relative
  attention 60 % (its gather backward peaks in the lowest layers, see `arch/deberta.py`), and never over by more
  than 5 %;
- the step's tensor peak never more than 2 % above the prediction and at most 5 % below it (10 % for the
  post-norm encoders, whose phases are BERT's: part of the S² tensors is freed before the score gradients peak).
"""

from __future__ import annotations

import pytest

from memfit.bench.suites.memory_model import ARCHITECTURES, supports, tiny_model
from memfit.memory.arch import UnsupportedArchitecture
from memfit.memory.estimate import baseline, estimate_step, step_peak
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec

from .conftest import batch_for, forward_backward, spec_for

ENCODER_TASKS = ("seq_cls", "token_cls")


def _cases():
    for name, (_, tasks, _) in ARCHITECTURES.items():
        for i, task in enumerate(tasks):
            # both kernels and both precisions per architecture; a second task once
            combos = [("sdpa", "bf16"), ("eager", "fp32")] if i == 0 else [("eager", "bf16")]
            for attn, precision in combos:
                attn = attn if supports(name, attn) else "eager"
                yield pytest.param(name, task, attn, precision, id=f"{name}-{task}-{attn}-{precision}")


@pytest.mark.parametrize("name,task,attn,precision", list(_cases()))
def test_estimate_matches_the_meter(name, task, attn, precision):
    model = tiny_model(name, task, attn)
    spec = spec_for(model, task, 2, 32, precision, attn)
    assert spec.model.arch is not None, spec.model.unsupported
    report, after_forward = forward_backward(model, batch_for(model, task, 2, 32), precision, MemoryMeter(model))
    est = baseline(spec)
    assert report.category_peaks.parameters == est.parameters
    assert report.category_peaks.gradients == est.gradients
    assert after_forward / est.activations == pytest.approx(1.0, abs=0.02)
    encoder = task in ENCODER_TASKS
    under = 0.6 if spec.model.arch.option("relative") else 0.13 if encoder else 0.08
    assert 0.95 <= report.category_peaks.temporaries / est.temporaries <= 1 + under
    assert (0.90 if encoder else 0.95) <= report.tensor_peak / step_peak(spec, est) <= 1.02


def test_every_family_is_in_the_matrix():
    from memfit.memory.arch import FAMILIES

    families = set()
    for name, (_, tasks, _) in ARCHITECTURES.items():
        families.add(RunSpec.from_model(tiny_model(name, tasks[0], "eager"), task=tasks[0]).model.family)
    assert families == {f.name for f in FAMILIES}


def _meta(model_type: str, task: str = "causal_lm", **fields):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **fields)
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


_TINY_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128)


@pytest.mark.parametrize("model_type,fields,says", [
    ("bloom", dict(hidden_size=64, n_layer=2, n_head=4), r"model_type 'bloom'.*BloomBlock.*matches none"),
    ("falcon", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True),
     r"model_type 'falcon' \(falcon block family\): ALiBi"),
    # beyond the tested list (memfit bench memory-model --only architectures, docs/benchmarks.md): refused, one line
    ("gemma3_text", dict(**_TINY_DECODER, head_dim=32), r"'gemma3_text' \(gemma block family\): .*q/k norms"),
    ("cohere", _TINY_DECODER, r"'cohere': its block CohereDecoderLayer .*matches none"),
    ("starcoder2", _TINY_DECODER, r"'starcoder2': its block Starcoder2DecoderLayer .*matches none"),
    ("olmo2", _TINY_DECODER, r"'olmo2': its block Olmo2DecoderLayer .*matches none"),
    ("phimoe", dict(**_TINY_DECODER, num_local_experts=4), r"'phimoe': its block PhimoeDecoderLayer .*matches none"),
    ("gptj", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), r"'gptj': its block GPTJBlock .*matches none"),
    ("codegen", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), r"'codegen': its block CodeGenBlock"),
    ("gpt_bigcode", dict(n_embd=64, n_layer=2, n_head=4), r"'gpt_bigcode' \(gpt2 block family\): .*multi-query"),
])
def test_an_unmodelled_architecture_is_one_clear_error(model_type, fields, says):
    """An architecture no family recognises (Bloom), or a feature its family lacks (Falcon with ALiBi): its
    parameters still count, and the activation estimate raises one error naming the model_type and what is
    missing."""
    model = _meta(model_type, vocab_size=512, **fields)
    spec = RunSpec.from_model(model, batch=2, seq=32)
    assert spec.model.family == "other" and spec.model.n_params > 0
    with pytest.raises(UnsupportedArchitecture, match=says):
        estimate_step(spec, [])


@pytest.mark.parametrize("model_type,fields,says", [
    ("distilbert", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128), r"'distilbert': its block TransformerBlock"),
    ("modernbert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
     r"'modernbert': its block ModernBertEncoderLayer .*matches none"),
    ("albert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    embedding_size=32), r"'albert': no list of 2 identical blocks"),  # one block shared by all
])
def test_an_unmodelled_encoder_is_one_clear_error(model_type, fields, says):
    spec = RunSpec.from_model(_meta(model_type, "seq_cls", vocab_size=512, **fields), task="seq_cls", batch=2, seq=32)
    assert spec.model.n_params > 0
    with pytest.raises(UnsupportedArchitecture, match=says):
        estimate_step(spec, [])


def test_a_decoder_for_another_task_is_refused():
    model = _meta("gpt2", "seq_cls", n_embd=64, n_layer=2, n_head=4, vocab_size=512, pad_token_id=0)
    with pytest.raises(UnsupportedArchitecture, match=r"gpt2 for causal_lm, not for task 'seq_cls'"):
        baseline(RunSpec.from_model(model, task="seq_cls"))


def test_large_configs_read_on_the_meta_device():
    """Shapes come from the modules and config of real-size models without allocating them (GQA, head_dim ≠
    hidden/heads, partial rotary, experts)."""
    cases = {
        "mistral": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                        num_hidden_layers=2, sliding_window=4096),
        "gemma": dict(hidden_size=3072, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                      intermediate_size=24576, num_hidden_layers=2),
        "gpt_neox": dict(hidden_size=2560, num_attention_heads=32, intermediate_size=10240, num_hidden_layers=2),
        "mixtral": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    }
    for model_type, fields in cases.items():
        m = RunSpec.from_model(_meta(model_type, **fields)).model
        assert m.arch is not None and m.n_layers == 2 and m.hidden == fields["hidden_size"]
    neox = RunSpec.from_model(_meta("gpt_neox", **cases["gpt_neox"])).model
    assert neox.arch.rotary_dim == 20  # rotary_pct 0.25 of head_dim 80
    gemma = RunSpec.from_model(_meta("gemma", **cases["gemma"])).model
    assert gemma.head_dim == 256 and gemma.n_heads * gemma.head_dim == 4096
    mixtral = RunSpec.from_model(_meta("mixtral", **cases["mixtral"])).model
    assert (mixtral.arch.experts, mixtral.arch.top_k, mixtral.intermediate) == (8, 2, 14336)


@pytest.mark.parametrize("model_type,fields,ok", [
    ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512), True),
    ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                 vocab_size=512), True),
    ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=512), False),
])
def test_cli_estimate_on_a_config_folder(tmp_path, data_dir, model_type, fields, ok):
    """`memfit estimate` on a folder holding only config.json: a table for a modelled architecture, one line and
    exit code 2 (no traceback) for one memfit cannot model."""
    import transformers
    import yaml
    from typer.testing import CliRunner

    from memfit.cli import app
    from train.recipes import toy_recipe

    transformers.AutoConfig.for_model(model_type, **fields).save_pretrained(tmp_path / model_type)
    recipe = toy_recipe("pretrain", data_dir)
    recipe["model"] = {"path": str(tmp_path / model_type)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["estimate", str(path)])
    if ok:
        assert result.exit_code == 0, result.output
        assert "activations" in result.output and "predicted step peak" in result.output
    else:
        assert result.exit_code == 2, result.output
        assert f"model_type '{model_type}'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "olmoe"])
def test_a_moe_router_is_no_lora_or_galore_target(name):
    """transformers holds a router (`mlp.gate`) as a bare weight of one row per expert: `all-linear` LoRA must not
    wrap it (peft cannot) and GaLore must not project it (its expert count is below any usual rank)."""
    from torch import nn

    from memfit.adapters.peft_tuner import resolve_targets
    from memfit.optim.common import is_target

    model = tiny_model(name, "causal_lm", "eager")
    live = dict(model.named_modules())
    targets = resolve_targets(RunSpec.from_model(model).model.params, "all-linear")
    assert targets and all(isinstance(live[t], nn.Linear) for t in targets)
    routers = [n for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert routers and not any(is_target(n, (4, 64)) for n in routers)
