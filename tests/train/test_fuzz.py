"""Property-based fuzzing of user input (hypothesis): malformed recipes, overrides and data files. Whatever is
generated, the CLI exits 2 with one line, no traceback, that names the file or key at fault and says what to do.

Each strategy only produces input that is invalid by construction (an unknown key, a value of the wrong type or
out of range, a broken data row), so "exit 2" is the right answer for every example. Derandomized: CI sees the
same examples every run.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memfit.cli import app

from .recipes import toy_recipe

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Words that say what to change; every message must hold one (besides naming the file or key).
ADVICE = ("should", "must", "allowed", "choose", "use ", "set ", "fix", "save", "point", "lower", "raise", "give",
          "pass", "check", "name", "write", "remove", "one of", "expected", "valid")

SECTIONS = {  # section -> its keys (an unknown key anywhere else must also be refused)
    "": ("name", "seed", "task", "model", "data", "train", "optimizer", "output_dir"),
    "train": ("steps", "batch_size", "grad_accum", "warmup_steps", "log_every", "eval_every", "save_every",
              "measure_steps", "keep_checkpoints", "min_lr_ratio", "decay_fraction"),
    "model": ("preset", "path"),
    "data": ("block_size", "val_fraction", "vocab_size", "max_chars"),
}
POSITIVE = {"steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "block_size", "max_chars"}
NON_NEGATIVE = {"warmup_steps", "eval_every", "save_every", "measure_steps", "seed"}
CHOICES = {"task": ("causal_lm", "seq_cls", "token_cls"), "schedule": ("cosine", "wsd", "constant"),
           "precision": ("fp32", "bf16")}

_word = st.text(string.ascii_lowercase + "_", min_size=2, max_size=12)
_non_numeric = _word.filter(lambda w: w not in ("true", "false", "null", "yes", "no", "on", "off", "inf", "nan"))


def _unknown_key():
    return st.tuples(st.sampled_from(sorted(SECTIONS)), _word).filter(
        lambda t: t[1] not in SECTIONS[t[0]] and t[1] not in ("schedule", "precision", "clip_grad_norm", "device",
                                                             "num_threads", "eval_batches", "decay_fraction",
                                                             "kind", "paths", "text_field", "overrides", "adapter",
                                                             "weights", "activations", "step", "kv"))


def _bad_value():
    """(section, key, a value that key must refuse)."""
    ints = st.sampled_from(sorted((POSITIVE | NON_NEGATIVE) - {"seed"} & set(SECTIONS["train"])))
    return st.one_of(
        st.tuples(st.just("train"), ints, st.one_of(_non_numeric, st.lists(st.integers(), min_size=1, max_size=2),
                                                    st.floats(0.1, 0.9))),
        st.tuples(st.just("train"), st.sampled_from(sorted(POSITIVE & set(SECTIONS["train"]))),
                  st.integers(-10**6, 0)),
        st.tuples(st.just("train"), st.sampled_from(["warmup_steps", "eval_every", "save_every"]),
                  st.integers(-10**6, -1)),
        st.tuples(st.just("train"), st.sampled_from(["schedule", "precision"]), _word),
        st.tuples(st.just(""), st.just("task"), _word),
        st.tuples(st.just("data"), st.just("block_size"), st.integers(-1000, 1)),
        st.tuples(st.just("data"), st.just("val_fraction"), st.one_of(st.floats(1.0, 1e6), st.floats(-1e6, 0.0))),
        st.tuples(st.just("model"), st.just("preset"), _word.map(lambda w: "llama-" + w)),
    ).filter(lambda t: not (t[1] in CHOICES and t[2] in CHOICES[t[1]]))


@pytest.fixture(scope="module")
def data() -> Path:
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="module")
def fuzz_base(data) -> dict:
    """A valid toy recipe (`memfit estimate` reads no data file, so it stays fast)."""
    return toy_recipe("pretrain", data)


def _key(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _assert_clean(result, *names: str) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and (result.exception is None or isinstance(result.exception, SystemExit)), out
    assert out.count("error:") == 1, out
    assert any(n in out for n in names), (names, out)
    assert any(a in out.lower() for a in ADVICE), out


def _write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "fuzz.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@FUZZ
@given(case=st.one_of(_unknown_key().map(lambda t: ("unknown", *t, 1)), _bad_value().map(lambda t: ("bad", *t))),
       as_override=st.booleans())
def test_malformed_recipe_or_override(case, as_override, tmp_path_factory, fuzz_base):
    kind, section, key, value = case
    folder = tmp_path_factory.mktemp("recipe")
    recipe = yaml.safe_load(yaml.safe_dump(fuzz_base))
    if as_override:
        argv = [str(_write_recipe(folder, recipe)), f"{_key(section, key)}={json.dumps(value)}"]
    else:
        (recipe.setdefault(section, {}) if section else recipe)[key] = value
        argv = [str(_write_recipe(folder, recipe))]
    result = CliRunner().invoke(app, ["estimate", *argv])
    _assert_clean(result, key)


@FUZZ
@given(item=st.one_of(
    _word,  # no '='
    st.tuples(st.sampled_from(["train.steps", "train.batch_size", "seed"]), _word).map(lambda t: f"{t[0]}.{t[1]}=1"),
    st.tuples(_word, _word).map(lambda t: f"train.{t[0]}x.{t[1]}=2"),  # into an unknown section key
))
def test_malformed_override_syntax(item, tmp_path_factory, fuzz_base):
    path = _write_recipe(tmp_path_factory.mktemp("ovr"), fuzz_base)
    result = CliRunner().invoke(app, ["estimate", str(path), item])
    _assert_clean(result, item, item.split("=")[0].rsplit(".", 1)[0])  # the override, or the key it reaches into


@FUZZ
@given(content=st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" in b or _not_utf8(b)),
    st.lists(_word, min_size=1, max_size=4).map(lambda ws: "\n".join(f"- {w}" for w in ws).encode()),
    st.sampled_from([b"[1, 2", b"{a: [", b"name: x\n  bad indent: [\n", b"\t- tab"]),
))
def test_malformed_recipe_file(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "broken.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["estimate", str(path)])
    _assert_clean(result, "broken.yaml")


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


_text_cell = st.text(string.ascii_letters + " ", min_size=1, max_size=20).filter(str.strip)
_good_rows = st.lists(st.tuples(_text_cell, st.integers(0, 1)), min_size=1, max_size=5)
_bad_bytes = st.binary(min_size=1, max_size=8).filter(lambda b: _not_utf8(b) and not set(b) & set(b"\n\r\t\0 "))
_breakage = st.one_of(
    _bad_bytes.map(lambda b: ("bytes", b)),
    st.just(("nul", b"a\0b")),
    st.integers(3, 5).map(lambda n: ("fields", n)),
    _non_numeric.map(lambda w: ("label", w)),
    st.integers(2, 99).map(lambda n: ("range", n)),
)


@FUZZ
@given(rows=_good_rows, at=st.integers(0, 5), breakage=_breakage)
def test_malformed_classification_file(rows, at, breakage, tmp_path_factory, data):
    lines = [f"{t}\t{y}".encode() for t, y in rows]
    kind, what = breakage
    if kind in ("bytes", "nul"):
        bad = b"good " + what + b"\t1"
    elif kind == "fields":
        bad = b"\t".join([b"x"] * what)
    else:  # a label that is no integer, or one out of range for num_labels=2
        bad = f"fine\t{what}".encode()
    lines.insert(min(at, len(lines)), bad)
    folder = tmp_path_factory.mktemp("cls")
    data = folder / "fuzz.tsv"
    data.write_bytes(b"sentence\tlabel\n" + b"\n".join(lines) + b"\n")
    recipe = toy_recipe("finetune-cls", data, steps=1, measure_steps=0)
    recipe["data"].update({"train": str(data), "eval": None, "num_labels": 2})
    result = CliRunner().invoke(app, ["train", str(_write_recipe(folder, recipe)), "-o", str(folder / "run")])
    _assert_clean(result, "fuzz.tsv")
    assert f"line {min(at, len(rows)) + 2}" in result.output, result.output  # the header is line 1


@FUZZ
@given(sentences=st.lists(st.lists(_word, min_size=1, max_size=4), min_size=1, max_size=3),
       breakage=st.one_of(_bad_bytes, st.just(b"lonely")))
def test_malformed_conll_file(sentences, breakage, tmp_path_factory, data):
    body = b"\n\n".join(b"\n".join(f"{w} O".encode() for w in s) for s in sentences)
    folder = tmp_path_factory.mktemp("ner")
    data = folder / "fuzz.conll"
    data.write_bytes(body + b"\n" + (b"x" + breakage + b" O" if breakage != b"lonely" else breakage) + b"\n")
    recipe = toy_recipe("finetune-ner", data, steps=1, measure_steps=0)
    recipe["data"].update({"train": str(data), "eval": None})
    result = CliRunner().invoke(app, ["train", str(_write_recipe(folder, recipe)), "-o", str(folder / "run")])
    _assert_clean(result, "fuzz.conll")
