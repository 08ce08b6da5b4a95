"""Generate text inside a memory budget: load a causal LM, apply a weight format and a KV policy, measure.

`generate(model, prompt, kv="h2o", kv_budget="20%", weights="int8")` returns the text plus a memory report by
category: weights (parameters + buffers), KV cache (the most the cache held after any forward, summed over its
tensors), activations and temporaries (tensor peak minus both), and the process peak.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.compat import cache_keyword, fail
from memfit.errors import ConfigError, ModelError
from memfit.kv.base import KVPolicy, PolicyCache, attn_implementation
from memfit.kv.budget import parse_size, tokens_for_bytes
from memfit.kv.peak import auto_chunk, decode_peak, prefill_peak
from memfit.kv.prefill import chunked_prefill
from memfit.memory.breakdown import MemoryBreakdown, format_bytes
from memfit.memory.measure import MemoryMeter, MemoryReport
from memfit.memory.spec import RunSpec, dtype_name

BUDGETED = ("streaming_llm", "h2o", "snapkv", "keyformer", "pyramid", "adakv")  # need a budget
OPTIONAL_BUDGET = ("kivi",)  # take one if given


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    memory: MemoryBreakdown  # parameters, buffers, kv_cache, activations (= tensor peak − weights − KV)
    kv_estimate: int
    report: MemoryReport
    seconds: float  # prefill + decoding, timed without the memory tracker
    policy: str
    options: dict[str, Any] = field(default_factory=dict)
    prefill_seconds: float = 0.0  # until the first new token (the prompt's forward, chunked prefill included)
    decode_seconds: float = 0.0  # the other new tokens
    prefill_chunk: int | None = None  # tokens per prefill forward (None: the prompt in one forward)
    peaks: dict[str, int] = field(default_factory=dict)  # tensor bytes above the weights: prefill/decode, measured
    peak_estimates: dict[str, int] = field(default_factory=dict)  # the same from `memfit.kv.peak`

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: new tokens after the first, per second of decoding."""
        if self.new_tokens > 1 and self.decode_seconds > 0:
            return (self.new_tokens - 1) / self.decode_seconds
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "memory": self.memory.to_dict(), "kv_estimate": self.kv_estimate,
                "process_peak": self.report.process_peak, "seconds": self.seconds,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "tokens_per_s": self.tokens_per_s,
                "policy": self.policy, "options": self.options, "prefill_chunk": self.prefill_chunk,
                "peaks_above_weights": self.peaks, "peak_estimates_above_weights": self.peak_estimates}

    def table(self):
        from rich.table import Table

        table = Table(title=f"generation memory ({self.policy})")
        table.add_column("category")
        table.add_column("measured", justify="right")
        table.add_column("estimate", justify="right")
        m = self.memory
        table.add_row("weights (parameters + buffers)", format_bytes(m.parameters + m.buffers), "")
        if self.options.get("streamed_weights_peak"):
            table.add_row("streamed weights resident (peak)", format_bytes(self.options["streamed_weights_peak"]), "")
        table.add_row("KV cache (max held)", format_bytes(m.kv_cache), format_bytes(self.kv_estimate))
        table.add_row("activations + temporaries", format_bytes(m.activations), "")
        chunk = f"chunks of {self.prefill_chunk}" if self.prefill_chunk else "one forward"
        for phase, label in (("prefill", f"prefill peak above weights ({chunk})"),
                             ("decode", "decode peak above weights")):
            if phase in self.peaks:
                table.add_row(label, format_bytes(self.peaks[phase]), format_bytes(self.peak_estimates[phase]))
        table.add_row("[bold]tensor peak", format_bytes(self.report.tensor_peak), "")
        if self.report.process_peak is not None:
            table.add_row("process peak (RSS high-water)", format_bytes(self.report.process_peak), "")
        return table


# --- inputs ----------------------------------------------------------------------------------------------

def resolve_model_dir(ref: str | Path) -> str:
    """A memfit run directory (its exported `model/`), a checkpoint-less run dir error, or the reference as is."""
    from memfit.models.load import looks_local

    path = Path(ref).expanduser()
    if not path.exists() and looks_local(str(ref)):
        raise ModelError(f"{ref}: no such folder; pass a memfit run directory or a model folder holding config.json")
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "model" / "config.json").exists():
            return str(path / "model")
        if (path / "checkpoints").exists():
            raise ModelError(f"{path} is a memfit run without an exported model/ folder (only checkpoints/); "
                             "finish the run or point at a folder holding config.json")
    return str(ref)


def load_causal_lm(ref: str | Path, attn: str = "sdpa") -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a local HF folder, a memfit run directory or a named model."""
    from memfit.models import load_model

    bundle = load_model(resolve_model_dir(ref), "causal_lm", attn_implementation=attn)
    return bundle.model.eval(), bundle.tokenizer


def resolve_budget(budget: float | str | None, prompt_tokens: int) -> int | None:
    """Tokens per layer and head from `256`, `"256"` or `"20%"` (of the prompt); `ConfigError` unless > 0. A size
    (`"64MiB"`) is resolved against the model by `resolve_kv_budget`."""
    if budget is None:
        return None
    text = str(budget).strip()
    if parse_size(text) is not None:
        if parse_size(text) <= 0:
            raise ConfigError(f"--kv-budget must be > 0, got {text}")
        return None
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if share <= 0:
                raise ConfigError(f"--kv-budget must be > 0, got {text}")
            return max(1, round(prompt_tokens * share / 100))
        value = float(text)
    except ValueError:
        raise ConfigError(f"--kv-budget must be a token count (e.g. 256), a share of the prompt (e.g. 20%) or a "
                          f"size in bytes (e.g. 64MiB), got '{text}'") from None
    if value <= 0 or value != int(value):
        raise ConfigError(f"--kv-budget must be a positive whole number of tokens, got {text}")
    return int(value)


def resolve_kv_budget(kv: str | dict | KVPolicy | None, budget: int | str | None, options: dict[str, Any],
                      spec: RunSpec) -> int | None:
    """Tokens per layer and head: as `resolve_budget`, or for a size in bytes the most tokens whose cache (by the
    policy's estimate, at its fullest) fits in it (`memfit.kv.budget.tokens_for_bytes`)."""
    nbytes = parse_size(str(budget)) if budget is not None else None
    if nbytes is None:
        return resolve_budget(budget, spec.seq)
    name = kv.name if isinstance(kv, KVPolicy) else (kv or "full") if not isinstance(kv, dict) else kv["name"]
    return tokens_for_bytes(lambda b: build_kv_policy(kv, b, **options), spec, nbytes, name)


def build_kv_policy(kv: str | dict | KVPolicy | None, budget: int | None = None, **options: Any) -> KVPolicy:
    """A KV policy from a name (+ budget/options), a recipe mapping, or an instance."""
    from memfit.kv import build_policy

    if isinstance(kv, KVPolicy):
        return kv
    if kv is None:
        kv = "full"
    spec = dict(kv) if isinstance(kv, dict) else {"name": kv}
    spec.update({k: v for k, v in options.items() if v is not None})
    if budget is not None:
        spec["budget"] = budget
    name = spec["name"]
    if name in BUDGETED and "budget" not in spec:
        raise ConfigError(f"KV policy '{name}' needs a budget: add --kv-budget N (tokens) or --kv-budget 20%")
    if name not in BUDGETED + OPTIONAL_BUDGET and "budget" in spec:
        raise ConfigError(f"KV policy '{name}' takes no budget; budgets apply to: "
                          f"{', '.join(BUDGETED + OPTIONAL_BUDGET)}")
    return build_policy(**spec)


def _apply_weights(model: nn.Module, weights: str | None, calibration: torch.Tensor,
                   embeddings: bool = False) -> None:
    if not weights:
        if embeddings:
            raise ConfigError("--quantize-embeddings needs a weight format: add --weights int8 (or int4, nf4, awq)")
        return
    from memfit.weights import apply_weights

    apply_weights(model, weights, calibration=calibration if weights == "awq" else None, embeddings=embeddings)


def _streamed_model(ref: str | Path, attn: str) -> tuple[nn.Module, Any]:
    if importlib.util.find_spec("memfit.weights.streaming") is None:
        raise ConfigError("--stream (weights streamed from disk) is not available yet in this memfit build")
    from memfit.models import load_tokenizer
    from memfit.weights.streaming import StreamedModel

    source = resolve_model_dir(ref)
    model = StreamedModel.from_pretrained(source, attn_implementation=attn)
    return model, load_tokenizer(source)


# --- the run -----------------------------------------------------------------------------------------------

def generate(model: str | Path | nn.Module, prompt: str | torch.Tensor, max_new_tokens: int = 64, *,
             tokenizer: Any = None, kv: str | dict | KVPolicy | None = None, kv_budget: int | str | None = None,
             kv_options: dict[str, Any] | None = None, weights: str | None = None,
             quantize_embeddings: bool = False, stream: bool = False,
             attn: str = "auto", prefill_chunk: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> GenerateResult:
    """Generate `max_new_tokens` after `prompt` with a KV policy and weight format, measuring memory by category.

    Generation runs twice with the same seed: once under the memory tracker (memory by category, the text),
    once without it (speed: the tracker's dispatch slows every op down, so timing it would understate decoding
    several times over). Prefill (up to the first new token) and decoding are timed apart."""
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    probe, impl = _check_policy(kv, kv_budget, kv_options, attn)
    lm, tokenizer = _load(model, tokenizer, prompt, stream, weights, attn, impl, probe.needs_attention)
    impl = attn_implementation(lm)  # an in-memory model under --attn auto keeps its own
    input_ids = _encode(prompt, tokenizer)
    prompt_tokens = input_ids.shape[1]
    spec = RunSpec.from_model(lm, batch=1, seq=prompt_tokens, compute_dtype=dtype_name(_dtype_of(lm)), attn_impl=impl)
    policy = build_kv_policy(kv, resolve_kv_budget(kv, kv_budget, kv_options or {}, spec), **(kv_options or {}))
    if weights or quantize_embeddings:
        _apply_weights(lm, weights, input_ids, quantize_embeddings)
    input_ids = input_ids.to(next(lm.parameters()).device)
    settings = _generation_kwargs(input_ids, tokenizer, max_new_tokens, do_sample, temperature, top_k)

    chunk = choose_prefill_chunk(policy, spec, prefill_chunk, impl)
    meters = {phase: MemoryMeter(lm, device=input_ids.device) for phase in ("prefill", "decode")}
    measured = _run(lm, policy, input_ids, chunk, settings, seed, meters)
    timed = _run(lm, policy, input_ids, chunk, settings, seed)
    options = dict(policy.config.model_dump(), weights=weights, quantize_embeddings=quantize_embeddings,
                   stream=stream, attn=impl, prefill_chunk=chunk,
                   streamed_weights_peak=getattr(lm, "peak_resident_bytes", None))
    reports = {phase: meter.report() for phase, meter in meters.items() if phase == "decode" or prompt_tokens > 1}
    return _result(lm, tokenizer, policy, prompt_tokens, reports, measured, timed, options, spec, chunk)


def choose_prefill_chunk(policy: KVPolicy, spec: RunSpec, prefill_chunk: int | None, attn: str) -> int | None:
    """Tokens per prefill forward: `prefill_chunk` when given (0: the whole prompt in one forward), else chosen
    from the budget for a policy that evicts or quantizes (`kv.peak.auto_chunk`), so the prefill peak is bounded
    by default; None (one forward) for the full cache."""
    if prefill_chunk is not None:
        if prefill_chunk < 0:
            raise ConfigError(f"--prefill-chunk must be ≥ 0 (0: the prompt in one forward), got {prefill_chunk}")
        return prefill_chunk or None
    return auto_chunk(policy, spec, attn)


def _result(lm: nn.Module, tokenizer: Any, policy: KVPolicy, prompt_tokens: int, reports: dict[str, MemoryReport],
            measured: _Pass, timed: _Pass, options: dict[str, Any], spec: RunSpec,
            chunk: int | None) -> GenerateResult:
    """Text and memory from the measured pass (activations = tensor peak − weights − KV), speed from the timed
    one; the prefill and decode peaks above the weights next to their estimates (`memfit.kv.peak`)."""
    new_ids = measured.output[0, prompt_tokens:]
    text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else str(new_ids.tolist())
    report = max(reports.values(), key=lambda r: r.tensor_peak)
    process_peaks = [r.process_peak for r in reports.values() if r.process_peak is not None]
    report = replace(report, process_peak=max(process_peaks) if process_peaks else None)
    weights_bytes = report.peak.parameters + report.peak.buffers
    memory = MemoryBreakdown(parameters=report.peak.parameters, buffers=report.peak.buffers,
                             kv_cache=measured.kv_peak,
                             activations=max(0, report.tensor_peak - weights_bytes - measured.kv_peak))
    seen = measured.cache.get_seq_length()
    peaks = {phase: r.tensor_peak - r.peak.parameters - r.peak.buffers for phase, r in reports.items()}
    estimates = {"prefill": prefill_peak(policy, spec, prompt_tokens - 1, chunk, spec.attn_impl),
                 "decode": decode_peak(policy, spec, seen, spec.attn_impl)}
    return GenerateResult(text=text, prompt_tokens=prompt_tokens, new_tokens=int(new_ids.numel()), memory=memory,
                          kv_estimate=_kv_estimate(policy, spec, prompt_tokens, chunk, seen), report=report,
                          seconds=timed.prefill_seconds + timed.decode_seconds, policy=policy.name,
                          prefill_seconds=timed.prefill_seconds, decode_seconds=timed.decode_seconds, options=options,
                          prefill_chunk=chunk, peaks=peaks, peak_estimates={k: estimates[k] for k in peaks})


def _kv_estimate(policy: KVPolicy, spec: RunSpec, prompt_tokens: int, chunk: int | None, seen: int) -> int:
    """The most the cache holds after any forward of the run (what `kv_peak` measures): after each prefill chunk of
    the first `prompt_tokens - 1` tokens, then after every decode step (KIVI's bytes drop when a group is packed,
    so the last count is not always the fullest)."""
    prefill = prompt_tokens - 1
    step = chunk or max(prefill, 1)
    counts = [*range(step, prefill, step), prefill, *range(prompt_tokens, seen + 1)]
    return max(policy.kv_bytes(spec, tokens=t) for t in counts if t > 0)


def _check_policy(kv: str | dict | KVPolicy | None, kv_budget: int | str | None, kv_options: dict | None,
                  attn: str) -> tuple[KVPolicy, str]:
    """(the policy as configured, the attention implementation to load): bad options fail before the model loads
    (the budget itself is checked by `resolve_budget` once the prompt length is known)."""
    if attn not in ("auto", "eager", "sdpa"):
        raise ConfigError(f"--attn must be auto, eager or sdpa, got '{attn}'")
    resolve_budget(kv_budget, 1)
    probe = build_kv_policy(kv, 10**9 if kv_budget is not None else None, **(kv_options or {}))
    impl = attn if attn != "auto" else ("eager" if probe.needs_attention else "sdpa")
    if probe.needs_attention and impl != "eager":
        raise ConfigError(f"KV policy '{probe.name}' ranks tokens by attention probabilities, which "
                          f"attn_implementation='{impl}' does not return; use --attn eager (or --attn auto)")
    return probe, impl


def _load(model: str | Path | nn.Module, tokenizer: Any, prompt: str | torch.Tensor, stream: bool,
          weights: str | None, attn: str, impl: str, needs_attention: bool) -> tuple[nn.Module, Any]:
    """(the causal LM in eval mode, its tokenizer): an in-memory model, a streamed folder, or a loaded folder."""
    if stream and weights:
        raise ConfigError("--weights and --stream together: save a quantized folder first "
                          "(memfit.weights.save_quantized) and stream that folder without --weights")
    if isinstance(model, nn.Module):
        if stream:
            raise ConfigError("--stream needs a model folder to stream from, not a model already in memory")
        if tokenizer is None and not isinstance(prompt, torch.Tensor):
            raise ConfigError("pass `tokenizer=` with an in-memory model and a text prompt")
        lm = model.eval()
        if attn != "auto" or needs_attention:
            lm.set_attn_implementation(impl)
        return lm, tokenizer
    if stream:
        return _streamed_model(model, impl)
    return load_causal_lm(model, impl)


def _generation_kwargs(input_ids: torch.Tensor, tokenizer: Any, max_new_tokens: int, do_sample: bool,
                       temperature: float, top_k: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  attention_mask=torch.ones_like(input_ids))
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    kwargs["pad_token_id"] = pad if pad is not None else (eos if eos is not None else 0)
    return kwargs


@dataclass
class _Pass:
    """One generation: its output ids, cache, the most the cache held, and its prefill / decode seconds."""

    output: torch.Tensor
    cache: PolicyCache
    kv_peak: int
    prefill_seconds: float
    decode_seconds: float


def _run(lm: nn.Module, policy: KVPolicy, input_ids: torch.Tensor, prefill_chunk: int | None,
         settings: dict[str, Any], seed: int, meters: dict[str, MemoryMeter] | None = None) -> _Pass:
    """Generate once with a fresh cache: all prompt tokens but the last through `chunked_prefill` (`prefill_chunk`
    at a time, or in one forward), then `model.generate`. Timing: prefill ends when the forward that yields the
    first new token returns; decoding is the rest. `meters`: measure the prefill and `generate` under one each."""
    torch.manual_seed(seed)
    phase = (lambda name: meters[name].region()) if meters else (lambda name: nullcontext())
    state: dict[str, Any] = {"cache": None, "kv_peak": 0, "generating": False, "first": None}

    def after_forward(module, args, kwargs, output):
        if state["cache"] is not None:
            state["kv_peak"] = max(state["kv_peak"], state["cache"].nbytes())
        if state["generating"] and state["first"] is None:
            state["first"] = time.perf_counter()

    handle = lm.register_forward_hook(after_forward, with_kwargs=True)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            state["cache"] = cache = policy.make_cache(lm)
            if input_ids.shape[1] > 1:
                with phase("prefill"):
                    chunked_prefill(lm, input_ids[:, :-1], cache, prefill_chunk or input_ids.shape[1])
            state["generating"] = True
            with phase("decode"):
                output = lm.generate(input_ids, **{cache_keyword(lm): cache}, **settings)
            end = time.perf_counter()
            _check_cache_used(cache, input_ids.shape[1])
    finally:
        handle.remove()
    first = state["first"] if state["first"] is not None else end
    return _Pass(output=output, cache=cache, kv_peak=state["kv_peak"], prefill_seconds=first - start,
                 decode_seconds=end - first)


def _check_cache_used(cache: PolicyCache, prompt_tokens: int) -> None:
    """`model.generate` must have run every prompt token through memfit's cache (not a cache of its own)."""
    if cache.get_seq_length() < prompt_tokens:
        raise fail(f"the KV policy's cache saw {cache.get_seq_length()} of the {prompt_tokens} prompt tokens",
                   "model.generate(past_key_values=cache) (or cache=) to store every key and value in the given cache")
    cache.verify()


def _encode(prompt: str | torch.Tensor, tokenizer: Any) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
    else:
        if not prompt:
            raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-file PATH")
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[0] != 1:
        raise ConfigError("memfit generate takes one prompt at a time")
    if ids.shape[1] == 0:
        raise ConfigError("the prompt encodes to no tokens")
    return ids.long()


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
