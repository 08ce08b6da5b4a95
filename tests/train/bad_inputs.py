"""The bad-input matrix: malformed recipes, overrides, data files, run directories and faults, each given to the
CLI in-process. Every case must end in one clear line (exit 2, no traceback) that names the file or key, or —
where memfit can recover without losing anything (a torn last metrics line, a corrupt newest checkpoint) — in a
normal run that says what it skipped.

`test_bad_inputs.py` runs every case; `cd tests && python -m train.bad_inputs` prints the matrix
(tried / clean / tracebacks) for a report.
"""

from __future__ import annotations

import builtins
import errno
import io
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .recipes import toy_recipe

BINARY = bytes(range(256)) * 4 + b"\x00\xff\xfe model: {"
LATIN1 = "name: café\n".encode("latin-1")  # text saved in another encoding than UTF-8


@dataclass
class Outcome:
    exit_code: int
    output: str
    exception: BaseException | None

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.output or not (self.exception is None or isinstance(self.exception, SystemExit))

    def verdict(self, case: Case) -> str:
        """clean | traceback | vague (right exit, message lacks the file/key) | accepted (exit 0) | failed."""
        if self.traceback:
            return "traceback"
        if case.recovers:
            return "clean" if self.exit_code == 0 and all(f in self.output for f in case.names) else "failed"
        if self.exit_code == 0:
            return "accepted"
        if self.exit_code == 2 and "Invalid value for '" in self.output:  # click's own check of an option's type
            return "clean" if all(f in self.output for f in case.names) else "vague"
        if self.exit_code != 2 or self.output.count("error:") != 1:
            return "failed"
        return "clean" if all(f in self.output for f in case.names) else "vague"


@dataclass
class Case:
    name: str
    build: Callable[[Workspace], list[str]]  # argv after `memfit`
    names: tuple[str, ...] = ()  # fragments the message must contain (the file, the key, what to change)
    recovers: bool = False  # memfit should carry on (exit 0) and say what it skipped
    fault: Callable[[Workspace], Any] | None = None  # a context manager simulating a fault while it runs


@dataclass
class Workspace:
    """A temporary folder plus lazily built inputs: toy recipes, a finished run with checkpoints, a model folder."""

    root: Path
    data: Path
    _cache: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def recipe(self, kind: str = "pretrain", name: str = "recipe.yaml", **data) -> Path:
        rec = toy_recipe(kind, self.data, steps=2, measure_steps=0)
        rec["data"].update(data)
        return self.file(name, yaml.safe_dump(rec))

    def out(self) -> str:
        return str(self.root / "out")

    def finished_run(self) -> Path:
        """A 4-step tiny Llama run with checkpoints at steps 2 and 4, copied fresh for each case."""
        if "run" not in self._cache:
            from typer.testing import CliRunner

            from memfit.cli import app

            rec = toy_recipe("pretrain", self.data, steps=4, save_every=2, measure_steps=0)
            path = self.file("_base/recipe.yaml", yaml.safe_dump(rec))
            run = self.root / "_base" / "run"
            result = CliRunner().invoke(app, ["train", str(path), "-o", str(run)])
            assert result.exit_code == 0, result.output
            self._cache.update(run=run, recipe=path)
        copy = self.root / f"run{len(list(self.root.glob('run*')))}"
        shutil.copytree(self._cache["run"], copy)
        return copy

    def base_recipe(self) -> Path:
        """The recipe of `finished_run` (a rerun with it continues or refuses, it does not fail validation)."""
        if "recipe" not in self._cache:
            self.finished_run()
        return self._cache["recipe"]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _torn_metrics(run: Path) -> Path:
    metrics = run / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + '{"step": 5, "lo')
    return run


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


class _FullFile(io.TextIOBase):
    """A writable file on a full disk: opening works, writing raises ENOSPC (as the kernel does)."""

    def __init__(self, inner):
        self._inner = inner

    def write(self, *_):
        raise OSError(errno.ENOSPC, "No space left on device")

    def writelines(self, *_):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._inner.close()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextmanager
def disk_full(root: Path) -> Iterator[None]:
    """Every write under `root` fails with ENOSPC: Python file writes and safetensors' (Rust) writes alike."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_open = builtins.open
    root = root.resolve()

    def under(target) -> bool:
        try:
            return isinstance(target, (str, Path)) and Path(target).resolve().is_relative_to(root)
        except (OSError, ValueError):
            return False

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if under(file) and any(c in mode for c in "wax+"):
            return _FullFile(handle)
        return handle

    def failing(real):
        def save(obj, filename, *args, **kwargs):
            if under(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(obj, filename, *args, **kwargs)
        return save

    import memfit.train.checkpoint as ckpt

    with ExitStack() as stack:
        from unittest import mock

        stack.enter_context(mock.patch.object(builtins, "open", fake_open))
        stack.enter_context(mock.patch.object(io, "open", fake_open))
        for mod in (safetensors.torch, ckpt):
            for fn in ("save_file", "save_model"):
                if hasattr(mod, fn):
                    stack.enter_context(mock.patch.object(mod, fn, failing(getattr(safetensors.torch, fn))))
        yield


def _cases() -> list[Case]:
    R = "recipe.yaml"
    c: list[Case] = []

    def add(name, build, *names, recovers=False, fault=None):
        c.append(Case(name, build, tuple(names), recovers, fault))

    # --- the recipe file and overrides
    add("recipe missing", lambda w: ["train", str(w.root / "missing.yaml")], "missing.yaml")
    add("recipe is a directory", lambda w: ["train", str(w.root)], "is a directory")
    add("recipe is binary garbage", lambda w: ["train", str(w.file("garbage.yaml", BINARY))], "garbage.yaml")
    add("recipe has invalid UTF-8", lambda w: ["train", str(w.file("latin1.yaml", LATIN1))], "latin1.yaml", "UTF-8")
    add("recipe is not YAML", lambda w: ["train", str(w.file("bad.yaml", "model: {preset: [\n"))], "bad.yaml")
    add("recipe is a list", lambda w: ["train", str(w.file("list.yaml", "- a\n- b\n"))], "list.yaml", "mapping")
    add("recipe is empty", lambda w: ["train", str(w.file("empty.yaml", ""))], "empty.yaml", "model")
    add("unknown top-level key", lambda w: ["train", str(w.recipe()), "modle.preset=x"], "modle", "allowed keys")
    add("unknown train key", lambda w: ["train", str(w.recipe()), "train.stepz=3"], "stepz", "allowed keys")
    add("train.steps not a number", lambda w: ["train", str(w.recipe()), "train.steps=abc"], "train.steps")
    add("train.steps zero", lambda w: ["train", str(w.recipe()), "train.steps=0"], "train.steps")
    add("override without =", lambda w: ["train", str(w.recipe()), "train.steps"], "train.steps", "key.path=value")
    add("override into a scalar", lambda w: ["train", str(w.recipe()), "train.steps.x=1"], "train.steps",
        "not a section")
    add("unknown optimizer", lambda w: ["train", str(w.recipe()), "optimizer.name=adamx"], "adamx", "adamw")
    add("unknown preset", lambda w: ["train", str(w.recipe()), "model.preset=llama-huge"], "llama-huge")
    add("learning rate not a number", lambda w: ["train", str(w.recipe()), "optimizer.lr=fast"], "lr")
    add("unknown data kind", lambda w: ["train", str(w.recipe()), "data.kind=parquet"], "data", "parquet")
    add("estimate: recipe is binary", lambda w: ["estimate", str(w.file("g2.yaml", BINARY))], "g2.yaml")
    add("estimate: recipe is a directory", lambda w: ["estimate", str(w.root)], "is a directory")
    add("plan: budget not a size", lambda w: ["plan", str(w.recipe()), "--budget", "lots"], "lots")

    # --- data files
    add("corpus missing", lambda w: ["train", str(w.recipe(paths=[str(w.root / "nope.txt")])), "-o", w.out()],
        "nope.txt")
    add("corpus is a directory", lambda w: ["train", str(w.recipe(paths=[str(w.root)])), "-o", w.out()],
        "directory")
    add("corpus empty", lambda w: ["train", str(w.recipe(paths=[str(w.file("empty.txt", ""))])), "-o", w.out()],
        "empty.txt")
    add("block larger than corpus", lambda w: ["train", str(w.recipe(paths=[str(w.file("tiny.txt", "to be or not"))])),
                                               "-o", w.out()], "block_size")
    add("JSONL corpus with a bad line",
        lambda w: ["train", str(w.recipe(paths=[str(w.file("c.jsonl", '{"text": "a"}\n{"text": \n'))])), "-o",
                   w.out()], "c.jsonl", "line 2")

    def cls(w, content: bytes, suffix="tsv", **data):
        rec = toy_recipe("finetune-cls", w.data, steps=1, measure_steps=0)
        rec["data"].update({"train": str(w.file(f"cls.{suffix}", content)), "eval": None, **data})
        return ["train", str(w.file(R, yaml.safe_dump(rec))), "-o", w.out()]

    add("TSV with invalid UTF-8", lambda w: cls(w, b"sentence\tlabel\ncaf\xe9 good\t1\nbad\t0\n"), "cls.tsv",
        "UTF-8", "line 2")
    add("TSV wrong column", lambda w: cls(w, b"text\tlabel\ngood\t1\nbad\t0\n"), "cls.tsv", "text_column")
    add("TSV label not an integer", lambda w: cls(w, b"sentence\tlabel\ngood\tpos\nbad\t0\n"), "cls.tsv", "pos")
    add("TSV header only", lambda w: cls(w, b"sentence\tlabel\n"), "cls.tsv", "no examples")
    add("TSV label out of range", lambda w: cls(w, b"sentence\tlabel\ngood\t1\nbad\t7\n", num_labels=2), "cls.tsv",
        "7")
    add("CSV row with extra fields", lambda w: cls(w, b"sentence,label\ngood,1\nbad,0,x\n", "csv"), "cls.csv",
        "line 3")
    add("classification file of unknown format", lambda w: cls(w, b"PAR1\x00\x01", "parquet"), "cls.parquet")
    add("classification file is binary", lambda w: cls(w, BINARY), "cls.tsv")

    def conll(w, content: bytes, **data):
        rec = toy_recipe("finetune-ner", w.data, steps=1, measure_steps=0)
        rec["data"].update({"train": str(w.file("ner.txt", content)), "eval": None, **data})
        return ["train", str(w.file(R, yaml.safe_dump(rec))), "-o", w.out()]

    add("CoNLL with invalid UTF-8", lambda w: conll(w, b"EU B-ORG 0\nr\xe9jects O 0\n"), "ner.txt",
        "UTF-8", "line 2")
    add("CoNLL with too few columns", lambda w: conll(w, b"EU\nrejects\n"), "ner.txt", "tag_column")
    add("CoNLL eval has an unseen tag", lambda w: conll(w, b"EU B-ORG 0\n\n", eval=str(
        w.file("ner-eval.txt", b"Paris B-LOC 0\n\n"))), "ner-eval.txt", "B-LOC")
    add("CoNLL empty", lambda w: conll(w, b"\n\n"), "ner.txt", "no sentences")

    # --- run directories and faults
    add("output directory cannot be created",
        lambda w: ["train", str(w.recipe()), "-o", str(w.file("afile", "x") / "run")], "afile")
    add("output is a non-empty folder memfit did not write",
        lambda w: ["train", str(w.recipe()), "-o", str(w.file("mine/notes.txt", "mine").parent)], "mine",
        "not a memfit run")
    add("disk full while writing the run", lambda w: ["train", str(w.recipe()), "-o", w.out()],
        "No space left", "out", fault=lambda w: disk_full(w.root / "out"))
    add("disk full while saving a checkpoint", lambda w: ["train", str(w.recipe()), "-o", w.out()],
        "No space left", "checkpoints", fault=lambda w: disk_full(w.root / "out" / "checkpoints"))

    def fresh_corpus(w):  # text no tokenizer was trained on yet, so the run has to write to the cache
        text = (w.data / "tinyshakespeare" / "input.txt").read_text()[:20000] + str(w.root)
        return ["train", str(w.recipe(paths=[str(w.file("fresh.txt", text))])), "-o", w.out()]

    def cache_full(w):
        from memfit.train.build import cache_dir

        return disk_full(cache_dir())

    add("disk full in the tokenizer cache", fresh_corpus, "could not cache the tokenizer", recovers=True,
        fault=cache_full)
    add("rerun into a finished run", lambda w: ["train", str(w.base_recipe()), "-o", str(w.finished_run())],
        "--resume")
    add("resume without a checkpoint", lambda w: ["train", str(w.recipe()), "--resume", "-o", w.out()],
        "no checkpoint")
    add("resume with a torn last metrics line",
        lambda w: ["train", str(w.base_recipe()), "--resume", "-o", str(_torn_metrics(w.finished_run()))],
        "metrics.jsonl", recovers=True)

    def bad_middle_line(w):
        run = w.finished_run()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        lines[1] = lines[1][:-5]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return ["train", str(w.base_recipe()), "--resume", "-o", str(run)]

    add("resume with a corrupt metrics line", bad_middle_line, "metrics.jsonl", "line 2")

    def truncated_latest(w):
        run = w.finished_run()
        _truncate(_checkpoints(run)[-1] / "model.safetensors")
        return ["train", str(w.base_recipe()), "--resume", "-o", str(run)]

    add("resume with a truncated latest checkpoint", truncated_latest, "corrupt", "step-0000002", recovers=True)

    def all_truncated(w):
        run = w.finished_run()
        for ck in _checkpoints(run):
            _truncate(ck / "model.safetensors")
        return ["train", str(w.base_recipe()), "--resume", "-o", str(run)]

    add("resume with every checkpoint truncated", all_truncated, "corrupt", "model.safetensors")

    # --- generate
    def model_copy(w) -> Path:
        return w.finished_run() / "model"

    def truncated_model(w):
        model = model_copy(w)
        _truncate(model / "model.safetensors")
        return ["generate", str(model), "-p", "ROMEO:", "-n", "2"]

    add("generate: truncated model.safetensors", truncated_model, "model.safetensors")

    def garbage_config(w):
        model = model_copy(w)
        (model / "config.json").write_bytes(BINARY)
        return ["generate", str(model), "-p", "ROMEO:", "-n", "2"]

    add("generate: config.json is garbage", garbage_config, "config.json")
    add("generate: model folder missing", lambda w: ["generate", str(w.root / "nomodel"), "-p", "x"], "nomodel")
    add("generate: empty prompt", lambda w: ["generate", str(model_copy(w)), "-p", ""], "prompt")
    add("generate: unknown KV policy", lambda w: ["generate", str(model_copy(w)), "-p", "x", "--kv", "lru"], "lru")
    add("generate: prompt file missing", lambda w: ["generate", str(model_copy(w)), "--prompt-file",
                                                    str(w.root / "p.txt")], "p.txt")
    add("generate: prompt file invalid UTF-8", lambda w: ["generate", str(model_copy(w)), "--prompt-file",
                                                          str(w.file("p.txt", b"caf\xe9"))], "p.txt", "UTF-8")
    add("generate: zero new tokens", lambda w: ["generate", str(model_copy(w)), "-p", "x", "-n", "0"],
        "max-new-tokens")

    # --- report and bench
    add("report: not a run", lambda w: ["report", str(w.root)], str("memfit run"))
    add("report: torn last metrics line", lambda w: ["report", str(_torn_metrics(w.finished_run()))],
        "metrics.jsonl", recovers=True)

    def garbage_summary(w):
        run = w.finished_run()
        (run / "memory.json").write_text('{"metrics": ')
        return ["report", str(run)]

    add("report: memory.json is corrupt", garbage_summary, "memory.json")
    add("bench: unknown suite", lambda w: ["bench", "nosuch", "--out", str(w.root / "b")], "nosuch")

    # --- recipes to estimate and plan
    add("estimate: recipe is a list", lambda w: ["estimate", str(w.file("l2.yaml", "- a\n"))], "l2.yaml", "mapping")
    add("estimate: recipe is empty", lambda w: ["estimate", str(w.file("e2.yaml", ""))], "e2.yaml")
    add("plan: recipe is binary", lambda w: ["plan", str(w.file("g3.yaml", BINARY)), "--budget", "1GB"], "g3.yaml")
    add("plan: recipe is a list", lambda w: ["plan", str(w.file("l3.yaml", "- a\n")), "--budget", "1GB"], "l3.yaml")
    for nproc in ("0", "-1", "abc"):
        add(f"plan: --nproc {nproc}", lambda w, n=nproc: ["plan", str(w.recipe()), "--budget", "1GB", "--nproc", n],
            "--nproc")
    add("plan --generate without a model", lambda w: ["plan", "--generate", "--budget", "1GB"], "--model")
    add("plan --generate without token counts",
        lambda w: ["plan", "--generate", "--model", str(model_copy(w)), "--budget", "1GB"], "--prompt-tokens")
    add("optimizer.offload misspelt", lambda w: ["train", str(w.recipe()), "optimizer.offload=dsk"], "offload",
        "disk")
    add("optimizer offload key misspelt", lambda w: ["train", str(w.recipe()), "optimizer.ofload=disk"], "ofload")

    # --- a model folder (model.path) with a damaged config.json or weights
    def folder_recipe(w, command: str, edit: Callable[[Path], None]) -> list[str]:
        model = model_copy(w)
        edit(model)
        rec = toy_recipe("pretrain", w.data, steps=1, measure_steps=0)
        rec["model"] = {"path": str(model)}
        return [command, str(w.file(R, yaml.safe_dump(rec)))] + (["-o", w.out()] if command == "train" else [])

    def config_edit(**change):
        def edit(model: Path) -> None:
            import json

            config = json.loads((model / "config.json").read_text())
            for key, value in change.items():
                if value is None:
                    config.pop(key)
                else:
                    config[key] = value
            (model / "config.json").write_text(json.dumps(config))
        return edit

    for command in ("estimate", "train"):
        add(f"{command}: config.json truncated",
            lambda w, c=command: folder_recipe(w, c, lambda m: _truncate(m / "config.json")), "config.json")
        add(f"{command}: config.json without hidden_size",
            lambda w, c=command: folder_recipe(w, c, config_edit(hidden_size=None)), "config.json",
            "does not describe these weights")
        add(f"{command}: config.json with vocab_size 0",
            lambda w, c=command: folder_recipe(w, c, config_edit(vocab_size=0)), "vocab_size")
    add("train: model.safetensors truncated",
        lambda w: folder_recipe(w, "train", lambda m: _truncate(m / "model.safetensors")), "model.safetensors")
    add("estimate: model.safetensors is garbage",
        lambda w: folder_recipe(w, "estimate", lambda m: (m / "model.safetensors").write_bytes(BINARY)),
        "model.safetensors")

    # --- prune
    def prune(w, model: str, *extra: str, out: str | None = None) -> list[str]:
        return ["prune", model, "-m", "llm-pruner", "-o", out or str(w.root / "pruned"), "--calib-samples", "2",
                "--calib-len", "16", *extra]

    def gpt2_folder(w) -> str:
        import transformers

        folder = w.root / "gpt2"
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=512)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        for tok in model_copy(w).glob("tok*"):
            shutil.copy(tok, folder)
        return str(folder)

    add("prune: model folder missing", lambda w: prune(w, str(w.root / "nomodel")), "nomodel")
    add("prune: a GPT-2 model", lambda w: prune(w, gpt2_folder(w)), "gpt2", "supported")
    add("prune: sparsity 1.5", lambda w: prune(w, str(model_copy(w)), "-s", "1.5"), "sparsity")
    add("prune: output is a folder the user owns",
        lambda w: prune(w, str(model_copy(w)), "--overwrite", out=str(w.file("mine2/notes.txt", "mine").parent)),
        "mine2", "not written by")
    return c


CASES = _cases()


def run_case(case: Case, ws: Workspace) -> Outcome:
    from typer.testing import CliRunner

    from memfit.cli import app

    argv = case.build(ws)
    with case.fault(ws) if case.fault else _nothing():
        result = CliRunner().invoke(app, argv)
    return Outcome(result.exit_code, result.output, result.exception)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main() -> None:
    import os
    import sys
    import tempfile
    from collections import Counter

    data = Path(os.environ.get("MEMFIT_TEST_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    os.environ.setdefault("MEMFIT_CACHE", str(Path(__file__).resolve().parents[2] / ".cache" / "memfit-test"))
    verbose = "-v" in sys.argv
    counts: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        shared = Workspace(Path(tmp) / "shared", data)
        for i, case in enumerate(CASES):
            ws = Workspace(Path(tmp) / f"case{i}", data, shared._cache)
            ws.root.mkdir(parents=True)
            try:
                outcome = run_case(case, ws)
                verdict = outcome.verdict(case)
            except Exception as exc:  # the harness itself failed on this case
                outcome, verdict = Outcome(-1, repr(exc), exc), "traceback"
            counts[verdict] += 1
            last = [line for line in outcome.output.strip().splitlines() if line.strip()][-1:] or [""]
            print(f"{verdict:9s} | {case.name:45s} | exit {outcome.exit_code} | {last[0][:150]}")
            if verbose and verdict != "clean":
                print(outcome.output)
    print(f"\ntried {len(CASES)}, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
