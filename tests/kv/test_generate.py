import json

import pytest
from typer.testing import CliRunner

from memfit.cli import app
from memfit.errors import ConfigError, ModelError
from memfit.generate import generate, resolve_budget

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def test_generate_reports_kv_bytes_equal_to_estimate(model_dir):
    full = generate(model_dir, TEXT[:200], 12, kv="full")
    h2o = generate(model_dir, TEXT[:200], 12, kv="h2o", kv_budget="20%")
    assert full.kv_estimate == full.memory.kv_cache > 0 and h2o.kv_estimate == h2o.memory.kv_cache
    assert h2o.memory.kv_cache < full.memory.kv_cache / 3
    assert h2o.options["attn"] == "eager" and full.options["attn"] == "sdpa"
    assert full.new_tokens == 12 and full.memory.parameters > 0 and full.report.process_peak


@pytest.mark.parametrize("kv, budget, options", [
    ("streaming_llm", 10, {}), ("h2o", 10, {}), ("keyformer", 10, {}), ("snapkv", 10, {"window": 4}),
    # kivi: 45 prompt tokens flush one 32-token group at prefill and none while decoding, so the most the cache
    # held is what it holds at the end, which is what the estimate describes
    ("pyramid", 10, {"window": 4}), ("kivi", None, {"bits": 2, "residual": 32}),
    ("kivi", 40, {"bits": 4, "residual": 16}), ("h2o", 10, {"quant": "kivi4"}), ("adakv", 10, {}),
])
def test_every_policy_shrinks_the_cache_to_its_estimate(model_dir, kv, budget, options):
    """memfit generate's measured KV bytes == the policy's estimate, well below the full cache's: fails if the
    policy had no effect (e.g. hooks that never saw the cache keep all 45 prompt tokens)."""
    full = generate(model_dir, TEXT[:200], 6, kv="full")
    got = generate(model_dir, TEXT[:200], 6, kv=kv, kv_budget=budget, kv_options=options)
    assert got.memory.kv_cache == got.kv_estimate > 0
    assert got.memory.kv_cache < full.memory.kv_cache / 2


def test_streaming_generation_equals_full_while_it_fits(model_dir):
    a = generate(model_dir, TEXT[:120], 10, kv="full")
    b = generate(model_dir, TEXT[:120], 10, kv="streaming_llm", kv_budget=a.prompt_tokens + 10, prefill_chunk=7)
    assert a.text == b.text


def test_resolve_budget():
    assert resolve_budget("20%", 100) == 20 and resolve_budget(64, 100) == 64 and resolve_budget(None, 5) is None
    for bad in ("0", "-5", "0%", "ten", "2.5"):
        with pytest.raises(ConfigError):
            resolve_budget(bad, 100)


def test_library_errors(model_dir):
    with pytest.raises(ConfigError, match="eager"):
        generate(model_dir, "hi", 2, kv="h2o", kv_budget=8, attn="sdpa")
    with pytest.raises(ConfigError, match="needs a budget"):
        generate(model_dir, "hi", 2, kv="h2o")
    with pytest.raises(ModelError):
        generate("/no/such/model", "hi", 2)


@pytest.mark.parametrize("args, match", [
    (["--kv", "h2o", "--kv-budget", "0"], "kv-budget must be"),
    (["--kv", "nope"], "unknown kv technique 'nope'"),
    (["--kv", "snapkv", "--kv-budget", "8", "--attn", "sdpa"], "eager"),
    (["--kv", "kivi", "--kv-bits", "3"], "bits"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--kv", "h2o", "--kv-budget", "1B"], "below the smallest 'h2o' cache"),
    (["--kv", "full", "--kv-budget", "1MiB"], "takes no budget"),
    (["--kv", "snapkv", "--kv-budget", "8", "--kv-quant", "kivi4"], "unknown key 'quant'"),
    (["--kv", "h2o", "--kv-budget", "8", "--kv-quant", "kivi3"], "quant"),
])
def test_cli_bad_input_is_one_clear_error(model_dir, args, match):
    result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", "the fox", *args])
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output


def test_cli_generates_and_prints_the_report(model_dir, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", "the quick brown fox", "-n", "6",
                                      "--kv", "kivi", "--kv-bits", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.output and "process peak" in result.output
    data = json.loads(out.read_text())
    assert data["new_tokens"] == 6 and data["memory"]["kv_cache"] == data["kv_estimate"]


def test_cli_kv_quant_composes_with_a_byte_budget(model_dir, tmp_path):
    """`--kv h2o --kv-quant kivi4 --kv-budget 8KiB`: more tokens than h2o alone in the same bytes, held = estimate."""
    runs = {}
    for extra in ([], ["--kv-quant", "kivi4"]):
        out = tmp_path / f"r{len(extra)}.json"
        result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", TEXT[:200], "-n", "4", "--kv", "h2o",
                                          "--kv-budget", "8KiB", *extra, "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs[bool(extra)] = json.loads(out.read_text())
    for data in runs.values():
        assert data["memory"]["kv_cache"] == data["kv_estimate"] <= 8 * 1024
    assert runs[True]["options"]["quant"] == "kivi4"
    assert runs[True]["options"]["budget"] > 1.5 * runs[False]["options"]["budget"]


def test_stream_and_weights_are_wired(model_dir):
    plain = generate(model_dir, TEXT[:80], 6, kv="streaming_llm", kv_budget=16)
    streamed = generate(model_dir, TEXT[:80], 6, kv="streaming_llm", kv_budget=16, stream=True)
    assert streamed.text == plain.text and streamed.memory.kv_cache == plain.memory.kv_cache
    int8 = generate(model_dir, TEXT[:80], 6, weights="int8")
    assert int8.memory.parameters + int8.memory.buffers < plain.memory.parameters + plain.memory.buffers
    with pytest.raises(ConfigError, match="--stream"):
        generate(model_dir, "hi", 2, weights="int8", stream=True)
