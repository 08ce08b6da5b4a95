"""`memfit prune`: writes a plain HF folder with the tokenizer, and never overwrites what memfit did not write."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from memfit.cli import app
from memfit.prune.common import MARKER


def _prune(model_dir, out, *extra):
    return CliRunner().invoke(app, ["prune", str(model_dir), "--method", "llm-pruner", "--sparsity", "0.5", "-o",
                                    str(out), "--calib-samples", "4", "--calib-len", "32", *extra])


def test_cli_writes_a_folder_transformers_loads(model_dir, tmp_path):
    out = tmp_path / "pruned"
    res = _prune(model_dir, out)
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "reloaded by transformers" in res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 88 and model.config.num_key_value_heads == 1
    assert len(AutoTokenizer.from_pretrained(out)) == model.config.vocab_size
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    res = _prune(model_dir, out)  # an earlier output: only with --overwrite
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert _prune(model_dir, out, "--overwrite").exit_code == 0


def test_cli_refuses_folders_it_did_not_write_and_bad_input(model_dir, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = _prune(model_dir, other, "--overwrite")
    assert res.exit_code == 2 and "not written by `memfit prune`" in res.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    res = CliRunner().invoke(app, ["prune", str(model_dir), "-m", "magnitude", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown pruning method" in res.output
    res = _prune(model_dir, tmp_path / "y", "--calib", str(tmp_path / "missing.txt"))
    assert res.exit_code == 2 and "calibration text not found" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_prunes_a_fused_phi3_folder(model_dir, tmp_path):
    """The whole `memfit prune` path (load with sdpa, calibrate, prune, write, reload and compare) on Phi-3."""
    from .test_families import build

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = tmp_path / "phi3"
    build("phi3", vocab=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    res = CliRunner().invoke(app, ["prune", str(base), "-m", "slicegpt", "-s", "0.25", "-o", str(tmp_path / "out"),
                                   "--calib-samples", "4", "--calib-len", "32"])
    assert res.exit_code == 0, res.output
    assert "reloaded by transformers: logits within 0.0e+00" in res.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Phi3ForCausalLM" and model.config.hidden_size == 48
