"""PEFT tuners as memfit techniques: the adapters themselves come from the `peft` library (Mangrulkar et al.,
"PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods", 2022); this module only chooses the target
modules, applies the tuner to the run's model and predicts the parameters it adds.

The estimate does not re-derive each tuner's shapes by hand: `transform_spec` builds a *skeleton* of the model on
the meta device from the spec's parameter names and shapes (2-D weights become `nn.Linear` / `nn.Embedding`), lets
`peft` wrap that skeleton with the same config, and reads the resulting parameters back. So any tuner peft knows
(LoRA, DoRA, IA3, LoHa, VeRA, ...) gets an exact parameter/gradient/optimizer estimate, including peft's fp32
upcast of adapter weights on a bf16/fp16 base (`autocast_adapter_dtype=True`) and the trainable copy of the
classification head that peft keeps in `modules_to_save`.

Adding another peft tuner = a small subclass overriding `peft_config` (see `lora.py`, `dora.py`).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from memfit.compat import fail
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ModelShape, ParamInfo, RunSpec, model_shape
from memfit.techniques.base import Context, Technique, TechniqueConfig

PEFT_PREFIX = "base_model.model."
HEAD_NAMES = ("lm_head", "classifier", "score")
"""Output heads: never adapter targets (peft's all-linear excludes them too); cls heads train in full."""
CLS_HEADS = ("classifier", "score")
EMBEDDING_HINTS = ("embed", "wte", "wpe", "shared")
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}


class PeftTunerConfig(TechniqueConfig):
    """Options shared by peft tuners: which modules the adapter targets."""

    target: Literal["all-linear"] | list[str] = "all-linear"


# --- which modules are targets -----------------------------------------------------------------------------

def _module_weights(params: tuple[ParamInfo, ...]) -> dict[str, ParamInfo]:
    """Module name -> its 2-D `.weight` ParamInfo (the modules an adapter may wrap)."""
    out = {}
    for p in params:
        if p.name.endswith(".weight") and len(p.shape) == 2:
            out[p.name[: -len(".weight")]] = p
    return out


def is_head(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in HEAD_NAMES or module_name.startswith("cls.")


def is_embedding(module_name: str) -> bool:
    last = module_name.rsplit(".", 1)[-1].lower()
    return any(h in last for h in EMBEDDING_HINTS)


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a list entry: the full name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def resolve_targets(params: tuple[ParamInfo, ...], target: str | list[str]) -> list[str]:
    """Full names of the modules to wrap. `all-linear` = every linear layer except the output head (and a
    mixture-of-experts router, which transformers holds as a bare weight, not an `nn.Linear`)."""
    from memfit.memory.arch import is_router

    modules = _module_weights(params)
    if target == "all-linear":
        names = [m for m in modules if not is_head(m) and not is_embedding(m) and not is_router(m)]
        if not names:
            raise ConfigError("adapter target 'all-linear' found no linear layer in this model")
        return names
    names, unmatched = [], []
    for t in target:
        hit = [m for m in modules if _matches(m, t)]
        if not hit:
            unmatched.append(t)
        names += [m for m in hit if m not in names]
    if unmatched:
        suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules if not is_head(m)})
        raise ConfigError(f"adapter target {unmatched} matches no module of this model; module names here "
                          f"include: {', '.join(suffixes)} (or use target: all-linear)")
    return names


def modules_to_save(params: tuple[ParamInfo, ...], task: str) -> list[str]:
    """Classification heads (randomly initialised) must train in full: peft keeps a trainable copy."""
    if task not in ("seq_cls", "token_cls"):
        return []
    present = {m.rsplit(".", 1)[-1] for m in _module_weights(params)}
    return [h for h in CLS_HEADS if h in present]


# --- the estimate: peft applied to a meta-device skeleton ---------------------------------------------------

_DTYPE_OF_BYTES = {4: torch.float32, 2: torch.bfloat16, 8: torch.float64}


_ADAPTED: dict[tuple, tuple[ParamInfo, ...]] = {}
"""`PeftTuner.adapted_params` by (tuner, config, parameters, task)."""


def _skeleton(params: tuple[ParamInfo, ...], targets: list[str]) -> nn.Module:
    """A meta-device module tree with the spec's parameter names; targets are real `nn.Linear` layers."""
    root = nn.Module()

    def module_at(path: str) -> nn.Module:
        mod = root
        if not path:
            return mod
        for part in path.split("."):
            if not hasattr(mod, part) or not isinstance(getattr(mod, part), nn.Module):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        return mod

    weights = _module_weights(params)
    by_name = {p.name: p for p in params}
    done: set[str] = set()
    for m in targets:
        w = weights[m]
        parent, _, leaf = m.rpartition(".")
        dtype = _DTYPE_OF_BYTES.get(int(w.bytes_per_element), torch.bfloat16)
        has_bias = f"{m}.bias" in by_name
        if is_embedding(m):
            layer = nn.Embedding(w.shape[0], w.shape[1], device="meta", dtype=dtype)
        else:  # a `Conv1D` target as the linear layer it is (peft's LoRA shapes are the same)
            out, inp = w.linear_shape
            layer = nn.Linear(inp, out, bias=has_bias, device="meta", dtype=dtype)
        module_at(parent).add_module(leaf, layer)
        done.update({f"{m}.weight", f"{m}.bias"})
    for p in params:
        if p.name in done:
            continue
        parent, _, leaf = p.name.rpartition(".")
        dtype = _DTYPE_OF_BYTES.get(int(p.bytes_per_element), torch.bfloat16)
        module_at(parent).register_parameter(
            leaf, nn.Parameter(torch.empty(p.shape, device="meta", dtype=dtype), requires_grad=p.trainable))
    return root


def _original_name(peft_name: str) -> tuple[str, str]:
    """Strip peft's wrapping from a parameter name: (original name, role: base|copy|orig|new)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    if ".base_layer." in name:
        return name.replace(".base_layer.", "."), "base"
    if ".original_module." in name:
        return name.replace(".original_module.", "."), "orig"
    m = re.search(r"\.modules_to_save\.[^.]+\.", name)
    if m:
        return name[: m.start()] + "." + name[m.end():], "copy"
    return name, "new"


class PeftTuner(Technique):
    """Base of every peft-backed adapter: freeze the base, wrap the targets, keep cls heads trainable."""

    slot = "adapter"
    needs_gradients = True
    Config = PeftTunerConfig
    libraries = ("peft",)
    allocator_churn = 2.5  # peft's per-target dropout copies and low-rank path (process grid, LoRA rows)

    # --- what each tuner states ---------------------------------------------------------------------
    def peft_config(self, target_modules: list[str], task_type: str | None, save: list[str] | None):
        """The `peft.PeftConfig` for these targets (subclasses override)."""
        raise NotImplementedError

    def extra_activation_bytes(self, spec: RunSpec, targets: list[str]) -> int:
        """Bytes the adapter adds to what forward saves for backward (0 unless a tuner says otherwise)."""
        return 0

    # --- building -----------------------------------------------------------------------------------
    def _targets(self, params: tuple[ParamInfo, ...]) -> list[str]:
        return resolve_targets(params, self.config.target)

    def _peft_targets(self, targets: list[str]) -> list[str]:
        """What peft receives: the user's names as given (so options naming modules match), else full names."""
        return list(self.config.target) if isinstance(self.config.target, list) else targets

    def check(self, ctx: Context) -> None:
        shape = model_shape(ctx.model)
        targets = self._targets(shape.params)
        live = dict(ctx.model.named_modules())
        wrong = [t for t in targets if t in live and not isinstance(live[t], (nn.Linear, nn.Embedding, nn.Conv1d))
                 and type(live[t]).__name__ != "Conv1D"]
        if wrong:
            raise ConfigError(f"adapter '{self.name}' cannot wrap {wrong[:3]}: not linear/embedding layers; "
                              f"name linear layers in `target`")

    def apply(self, ctx: Context) -> None:
        import peft

        shape = model_shape(ctx.model)
        targets = self._targets(shape.params)
        task_type = TASK_TYPES.get(ctx.spec.task)
        # peft adds the cls head to modules_to_save itself for SEQ_CLS / TOKEN_CLS task types
        config = self.peft_config(self._peft_targets(targets), task_type, None)
        try:
            ctx.model = peft.get_peft_model(ctx.model, config)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"adapter '{self.name}': peft refused the config: {str(exc).splitlines()[0]}") from None
        self.check_wrapped(ctx.model, targets)

    def check_wrapped(self, model: nn.Module, targets: list[str]) -> None:
        """Every target is now a peft tuner layer and only part of the model trains; else a `CompatError`."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        wrapped = {n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        missing = [t for t in targets if t not in wrapped]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if missing or not 0 < trainable < total:
            what = (f"{len(missing)} of {len(targets)} target modules (e.g. {missing[0]}) were not wrapped"
                    if missing else f"{trainable:,} of {total:,} parameters train")
            raise fail(f"adapter '{self.name}': after peft.get_peft_model {what}",
                       "peft to replace every target module with a tuner layer and to freeze the base model",
                       ("peft", "transformers"))

    # --- estimating ---------------------------------------------------------------------------------
    def adapted_params(self, model: ModelShape, task: str) -> tuple[ParamInfo, ...]:
        """Every parameter of the adapted model, named as peft names them, with trainability and bytes (memoised:
        building peft's skeleton takes ~0.5 s, and the planner asks for the same model in hundreds of plans)."""
        from memfit.memory.cache import memo

        key = (type(self), self.config.model_dump_json(), model.params, task)
        if key not in _ADAPTED:
            if len(_ADAPTED) >= 64:
                _ADAPTED.clear()
            # on disk too: peft imports transformers' modeling code (seconds), which planning otherwise never needs
            _ADAPTED[key] = memo("adapted", (f"{type(self).__module__}.{type(self).__qualname__}", *key[1:]),
                                 lambda: self._adapted_params(model, task), ("adapters", "memory/spec.py"),
                                 ("torch", "transformers", "peft"))
        return _ADAPTED[key]

    def _adapted_params(self, model: ModelShape, task: str) -> tuple[ParamInfo, ...]:
        import peft

        targets = self._targets(model.params)
        save = modules_to_save(model.params, task) or None
        skeleton = _skeleton(model.params, targets)
        for p in skeleton.parameters():
            p.requires_grad_(False)
        with _quiet():
            wrapped = peft.get_peft_model(skeleton, self.peft_config(self._peft_targets(targets), None, save))
        original = {p.name: p for p in model.params}
        out = []
        for name, p in wrapped.named_parameters():
            orig_name, role = _original_name(name)
            if role == "new" and orig_name not in original:  # an adapter tensor peft created
                out.append(ParamInfo(name, tuple(p.shape), p.element_size(), p.requires_grad))
            else:
                base = original[orig_name]
                out.append(ParamInfo(name, base.shape, base.bytes_per_element, role == "copy",
                                     transposed=base.transposed))
        return tuple(out)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        params = self.adapted_params(spec.model, spec.task)
        targets = self._targets(spec.model.params)
        extra = {**spec.extra, "adapter_targets": targets}
        return spec.with_(model=_replace_params(spec.model, params), extra=extra)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        targets = spec.extra.get("adapter_targets", [])
        return base.with_(activations=base.activations + self.extra_activation_bytes(spec, targets))


def lora_activation_bytes(spec: RunSpec, r: int, n_targets: int) -> int:
    """What LoRA adapters (`lora_A` / `lora_B` of rank `r` on `n_targets` linears) add to what the blocks save: per
    wrapped linear, lora_B's input (lora_A's output: tokens × r, in the compute dtype). Under autocast the input is
    cast to the fp32 adapter's dtype first, so lora_A saves its own cast copy even of an input already in the compute
    dtype: where another op keeps that input anyway (`Family.kept_inputs`, e.g. the attention output the kernel
    saves), the copy is extra. (What the frozen base keeps or not is the block family's, `arch/flow.py`.)"""
    from memfit.memory.arch import family_of
    from memfit.memory.arch.flow import block_path
    from memfit.memory.arch.parts import dtypes

    d = dtypes(spec)
    out = spec.tokens * r * d.compute * n_targets
    if d.autocast:
        kept = family_of(spec.model).kept_inputs(spec)
        for p in spec.model.params:
            where = block_path(spec.model, p.name) if ".lora_A" in p.name and len(p.shape) == 2 else None
            if where is not None and where[1].split(".lora_A")[0] in kept:
                out += spec.tokens * p.shape[1] * d.compute
    return out


def _replace_params(model: ModelShape, params: tuple[ParamInfo, ...]) -> ModelShape:
    from dataclasses import replace

    return replace(model, params=params)


class _quiet:
    """Silence peft's warnings while wrapping the meta skeleton (they concern the real model, warned once there)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class LoraLikeConfig(PeftTunerConfig):
    """LoRA's options (DoRA shares them)."""

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="scale numerator; default 2*r")
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False


class LoraLike(PeftTuner):
    """LoRA-family tuners configured through `peft.LoraConfig`."""

    Config = LoraLikeConfig
    use_dora: bool = False

    def peft_config(self, target_modules: list[str], task_type: str | None, save: list[str] | None):
        import peft

        c = self.config
        return peft.LoraConfig(
            r=c.r, lora_alpha=c.alpha if c.alpha is not None else 2 * c.r, lora_dropout=c.dropout,
            target_modules=list(target_modules), task_type=task_type, modules_to_save=save,
            use_rslora=c.rslora, use_dora=self.use_dora,
        )

    def extra_activation_bytes(self, spec: RunSpec, targets: list[str]) -> int:
        return lora_activation_bytes(spec, self.config.r, len(targets))

    def check(self, ctx: Context) -> None:
        if ctx.has_quantized_base():
            raise ConfigError(f"adapter '{self.name}' cannot wrap the quantized layers of the 'weights' technique; "
                              "for LoRA over a quantized base remove 'weights' and use adapter: {name: qlora} "
                              "(format: nf4 | int4 | int8)")
        super().check(ctx)
