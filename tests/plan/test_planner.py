"""The planner: the space is what the techniques declare, the choice goes by expected quality then speed within the
budget (process peak by default, tensors with scope="tensors"), and the chosen plan measures within its
prediction."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memfit.cli import app
from memfit.errors import BudgetError, ConfigError
from memfit.plan import choose, parse_bytes, plan, verify

from train.recipes import toy_recipe


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    assert parse_bytes("1000") == 1000
    with pytest.raises(ConfigError, match="2GiB"):
        parse_bytes("lots")


def _toy(data_dir):
    recipe = toy_recipe("pretrain", data_dir)
    recipe["model"] = {"preset": "llama-tiny"}
    recipe["data"].update({"block_size": 128, "vocab_size": 512})
    recipe["train"].update({"batch_size": 8, "device": "cpu"})
    return recipe


def _by_label(result):
    return {r.label: r for r in result.rows}


def test_from_scratch_never_plans_adapters_and_full_adamw_wins_when_it_fits(data_dir):
    result = plan(_toy(data_dir), budget=2**40)
    names = {n for r in result.rows for n in r.candidate.names}
    assert not names & {"lora", "qlora", "dora", "lisa", "lst"}  # needs_pretrained, declared by the adapters
    assert {"adamw", "galore", "checkpointing", "chunked_ce", "streambp", "mezo"} <= names
    assert result.pruned > 0
    assert result.chosen.label == "adamw (32-true)"
    assert result.seconds < 5  # CPU seconds choosing among every combination (about 1 s on this machine)


def test_declared_conflicts_prune_the_space(data_dir):
    result = plan(_toy(data_dir), budget=2**40)
    for r in result.rows:
        names = r.candidate.names
        assert not ("streambp" in names and ("checkpointing" in names or "chunked_ce" in names))
        assert not ("mezo" in names and any(t.slot == "activations" for t in r.candidate.techniques))
        if "streambp" in names:
            assert not any(getattr(t.config, "layerwise", False) for t in r.candidate.techniques)


def test_issue17_methods_are_offered_where_they_apply(data_dir):
    """WTA-CRS, Q-GaLore and ZO2 from scratch on a causal Llama, MEFT when fine-tuning; never in a combination
    their `check` refuses, and every one estimated."""
    result = plan(_toy(data_dir), budget=2**40)
    names = {n for r in result.rows for n in r.candidate.names}
    assert {"wta_crs", "q_galore", "zo2"} <= names
    for r in result.rows:
        n = set(r.candidate.names)
        assert r.peak is not None, (r.label, r.problem)
        if "wta_crs" in n:
            assert not n & {"checkpointing", "streambp", "mezo", "zo2", "q_galore"}
        if "zo2" in n:
            assert not any(t.slot == "activations" for t in r.candidate.techniques)
        if "q_galore" in n:
            assert not any(getattr(t.config, "layerwise", False) for t in r.candidate.techniques)
    zo2 = _by_label(result)["zo2 (32-true)"]  # a step that is its own optimizer: the recipe keeps no optimizer lr
    assert verify(zo2, steps=2).memory.tensor_peak <= zo2.peak
    tuned = plan(_toy(data_dir), budget=2**40, pretrained=True)
    rows = _by_label(tuned)
    meft, lora = rows["meft + adamw (32-true)"], rows["lora r=16 + adamw (32-true)"]
    assert meft.peak is not None and meft.quality < lora.quality  # measured near chance on SST-2: a low prior
    assert not any("meft" in r.candidate.names and "checkpointing" in r.candidate.names for r in tuned.rows)


def test_fine_tuning_ranks_full_then_lora_then_qlora(data_dir):
    recipe = _toy(data_dir)
    recipe["model"] = {"preset": "llama-350m"}  # meta device; large enough that LoRA saves more than it costs on
    recipe["train"]["batch_size"] = 1  # CPU (peft's RSS and allocator churn: on llama-20m LoRA's process peak is higher)
    result = plan(recipe, budget=2**40, pretrained=True)
    rows = _by_label(result)
    full, lora, qlora = rows["adamw (32-true)"], rows["lora r=16 + adamw (32-true)"], rows["qlora r=16 + adamw (32-true)"]
    assert full.quality > lora.quality > qlora.quality
    assert result.chosen is full
    # a budget LoRA fits and full fine-tuning does not: LoRA (not the smaller QLoRA) wins
    budget = (lora.process_peak + full.process_peak) // 2
    assert lora.process_peak < full.process_peak
    result = plan(recipe, budget=budget, pretrained=True)
    assert result.chosen.quality >= lora.quality - 1e-9 and "qlora" not in result.chosen.label
    assert rows["lora r=16 + adamw (32-true)"].recipe["optimizer"]["lr"] == pytest.approx(10 * recipe["optimizer"]["lr"])
    galore = next(r for r in result.rows if "galore" in r.candidate.names)
    assert galore.recipe["optimizer"]["scale"] == 4.0  # GaLore's fine-tuning scale on pretrained weights


def test_budget_scope_process_includes_the_runtime(data_dir):
    recipe = _toy(data_dir)
    tensors = plan(recipe, budget=2**40, scope="tensors")
    baseline = _by_label(tensors)["adamw (32-true)"]
    assert baseline.process_peak - baseline.peak == baseline.breakdown.runtime > 100 * 2**20
    budget = baseline.peak + 1
    assert plan(recipe, budget=budget, scope="tensors").chosen.label == "adamw (32-true)"
    with pytest.raises(BudgetError, match="process peak"):
        plan(recipe, budget=budget).chosen
    with pytest.raises(ConfigError, match="scope"):
        plan(recipe, budget=budget, scope="gpu")


def test_pareto_set_and_why(data_dir):
    result = plan(_toy(data_dir), budget=2**40)
    front = result.pareto()
    assert result.chosen in front
    for r in front:  # nobody fitting beats a Pareto plan on all three axes
        assert not any(o.process_peak < r.process_peak and o.tokens_per_s > r.tokens_per_s and o.quality > r.quality
                       for o in result.fitting)
    assert "highest expected quality" in result.why()


def test_chosen_plan_measures_within_prediction(data_dir):
    recipe = _toy(data_dir)
    full = _by_label(plan(recipe, budget=2**40, scope="tensors"))["adamw (32-true)"]
    result = plan(recipe, budget=full.peak - 1, scope="tensors")
    chosen = result.chosen
    run = verify(chosen, steps=2)
    assert run.memory.tensor_peak <= chosen.peak * 1.10
    assert run.memory.tensor_peak <= full.peak


def test_plan_cli(tmp_path, data_dir):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_toy(data_dir)))
    out = tmp_path / "chosen.yaml"
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "4GiB", "--write", str(out)])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "why:" in result.output and "Pareto" in result.output and out.exists()
    assert yaml.safe_load(out.read_text())["optimizer"]["name"] == "adamw"
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "10KiB"])
    assert result.exit_code == 2 and "no plan fits" in result.output


def test_plan_cli_for_a_named_model_config(tmp_path):
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["plan", "--model", str(path), "--task", "finetune-causal", "--budget", "24GiB",
                                      "--seq", "256", "--batch", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["task_kind"] == "finetune" and data["chosen"]["plan"] == "adamw (32-true)"
    assert data["recipe"]["model"]["path"] == str(path) and data["recipe"]["train"]["batch_size"] == 2
    assert any("lora" in r["plan"] for r in data["rows"])
    result = CliRunner().invoke(app, ["plan", "--model", str(path), "--task", "sing", "--budget", "1GiB"])
    assert result.exit_code == 2 and "--task" in result.output


def test_plan_per_rank_for_nproc(data_dir):
    """`plan(..., nproc=2)`: each row is one FSDP2 rank's estimate (`estimate_rank`), techniques that cannot run
    sharded are left out, and the written recipe launches that many ranks."""
    from memfit.distributed.support import refusal
    from memfit.memory.sharding import estimate_rank
    from memfit.plan.meta import meta_facts, spec_for
    from memfit.recipe import load_recipe

    recipe = _toy(data_dir)
    single = plan(recipe, budget=2**40, pretrained=True)
    assert any(refusal(t) for r in single.rows for t in r.candidate.techniques)  # lisa, badam, mezo... offered here
    sharded = plan(recipe, budget=2**40, pretrained=True, nproc=2)
    assert sharded.nproc == 2 and sharded.to_dict()["per_rank"]
    assert sharded.rows and not any(refusal(t) for r in sharded.rows for t in r.candidate.techniques)
    base = load_recipe(recipe)
    one, two = _by_label(single), _by_label(sharded)
    for label in ("adamw (32-true)", "lora r=16 + adamw (bf16-mixed)", "checkpointing + galore rank=16 (32-true)"):
        row = two[label]
        spec = spec_for(base, meta_facts(base), row.candidate.precision)
        rank = estimate_rank(spec, list(row.candidate.techniques), 2)
        assert (row.peak, row.breakdown.optimizer) == (rank.peak, rank.breakdown.optimizer)
        assert row.peak < one[label].peak and row.process_peak - row.peak == row.breakdown.runtime
        assert row.recipe["distributed"]["nproc"] == 2
    with pytest.raises(ConfigError, match="split evenly"):
        plan({**recipe, "train": {**recipe["train"], "batch_size": 3}}, budget=2**40, nproc=2)


def test_plan_cli_nproc_says_per_rank(tmp_path, data_dir):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_toy(data_dir)))
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "4GiB", "--nproc", "2"])
    assert result.exit_code == 0, result.output
    assert "each of 2 ranks" in result.output and "per rank (2 ranks)" in result.output
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "4GiB", "--nproc", "2", "--verify"])
    assert result.exit_code == 2 and "memfit train" in result.output
