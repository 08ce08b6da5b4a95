"""Recipes: one YAML file describes a run; pydantic validates it and names the allowed keys on a typo.

```yaml
name: pretrain-llama-20m
task: causal_lm
model: {preset: llama-20m}
data: {kind: text, paths: [../shared/data/warpeace/input.txt], block_size: 256}
train: {steps: 600, batch_size: 16, schedule: cosine, warmup_steps: 60}
optimizer: {name: adamw, lr: 1.0e-3}
activations: [{name: checkpointing}]
```
Technique slots (`weights`, `adapter`, `activations`, `optimizer`, `step`, `kv`) take a technique name or a mapping
with `name` and its options; each technique validates its own options (`memfit.techniques.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memfit.data.config import DataConfig
from memfit.errors import ConfigError
from memfit.memory.precision import Precision, precision
from memfit.techniques.base import Technique
from memfit.techniques.registry import MULTI_SLOTS, SLOTS, build_technique


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Exactly one of: a Llama `preset` built from config, a `path` (local HF dir, named model, hub id), or a
    `config` (a config.json or a folder holding one: the model built on the meta device, for estimate / plan)."""

    preset: str | None = None
    path: str | None = None
    config: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # config fields for presets, e.g. num_hidden_layers
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # weights as loaded; auto: the precision's storage

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if sum(x is not None for x in (self.preset, self.path, self.config)) != 1:
            raise ValueError("set exactly one of 'preset' (e.g. llama-20m), 'path' (e.g. minilm-l6 or a folder) or "
                             "'config' (a config.json, for estimate and plan)")
        return self


class TrainConfig(_Strict):
    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # warmup-stable-decay: last fraction of steps decays
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    precision: str = "32-true"  # Lightning's names (memory/precision.py); fp32 / bf16 / fp16 still accepted
    master_weights: Literal["none", "fp32"] = "none"  # bf16-true/16-true: fp32 copy of what trains (else rounding)
    clip_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_batches: int | None = Field(None, gt=0)  # cap on eval batches (None: the whole eval set)
    save_every: int = Field(0, ge=0)  # 0: save only at the end
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept; resume falls back to an older one if corrupt
    log_every: int = Field(10, gt=0)
    measure_steps: int = Field(2, ge=0)  # steps measured by category (the first ones; 0 turns it off)
    device: str = "auto"
    num_threads: int | None = Field(None, gt=0)
    compile: bool = False  # torch.compile each decoder block after the techniques apply (memfit/train/compile.py)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # aot_eager/eager: debugging, tests

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_name(cls, value: Any) -> str:
        try:
            return precision(str(value)).name
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @property
    def policy(self) -> Precision:
        return precision(self.precision)

    @model_validator(mode="after")
    def _master_weights(self) -> TrainConfig:
        if self.master_weights != "none" and not self.policy.true_low:
            raise ValueError(f"master_weights: {self.master_weights} applies to bf16-true and 16-true (weights stored "
                             f"in 16 bits); precision {self.precision} already trains fp32 weights")
        return self


class DistributedConfig(_Strict):
    """Multi-process training on FSDP2 (`memfit.distributed`): `memfit train R --nproc N` or torchrun."""

    nproc: int = Field(1, ge=1)  # ranks `memfit train` launches on this machine (torchrun sets its own)
    reshard_after_forward: bool = True  # True: ZeRO-3 (blocks re-gathered in backward); False: ZeRO-2
    offload: Literal["none", "cpu"] = "none"  # cpu: FSDP2's CPUOffloadPolicy (GPU runs: shards, gradients, state on the host)


class Recipe(_Strict):
    name: str = "run"
    seed: int = 0
    task: Literal["causal_lm", "seq_cls", "token_cls"] = "causal_lm"
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    optimizer: str | dict[str, Any] = "adamw"
    adapter: str | dict[str, Any] | None = None
    weights: str | dict[str, Any] | None = None
    activations: list[str | dict[str, Any]] = Field(default_factory=list)
    step: str | dict[str, Any] = "backprop"
    kv: str | dict[str, Any] | None = None
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str = "runs"

    @model_validator(mode="after")
    def _techniques_valid(self) -> Recipe:
        built = self.techniques()  # raises ConfigError with the technique's own message
        storage = self.train.policy.storage
        if self.model.dtype not in ("auto", storage) and not any(
                t.slot == "adapter" and not getattr(t, "trains_base", False) for t in built):
            raise ConfigError(f"model.dtype {self.model.dtype} with precision {self.train.precision} would train "
                              f"{self.model.dtype} weights that the precision stores in {storage}; use precision "
                              f"{'bf16-true' if self.model.dtype == 'bf16' else '16-true' if self.model.dtype == 'fp16' else '32-true'}"
                              f", drop model.dtype, or freeze the base with an adapter (lora, qlora, ...)")
        if self.train.compile and self.distributed.nproc > 1:
            raise ConfigError("train.compile: true is not built for distributed runs (FSDP2 wraps the blocks); "
                              "set train.compile: false or distributed.nproc: 1")
        return self

    @property
    def model_dtype(self) -> str:
        """The dtype the model's weights are loaded in: `model.dtype`, or the precision's storage dtype."""
        return self.train.policy.storage if self.model.dtype == "auto" else self.model.dtype

    def techniques(self) -> list[Technique]:
        """Build every configured technique (validated by its own config class), in slot order."""
        built = []
        for slot in SLOTS:
            value = getattr(self, slot)
            if value is None:
                continue
            if slot in MULTI_SLOTS:
                names = [v if isinstance(v, str) else v.get("name") for v in value]
                if len(set(names)) != len(names):
                    raise ConfigError(f"'{slot}' lists a technique twice: {names}")
                built += [build_technique(slot, v) for v in value]
            else:
                built.append(build_technique(slot, value))
        owner = next((t for t in built if getattr(t, "owns_optimizer", False)), None)
        if owner is not None:  # the step brings its own update rule: the optimizer slot must be the default
            for t in built:
                if t.slot == "optimizer" and not (t.name == "adamw" and t.config == type(t.config)(name="adamw")):
                    raise ConfigError(f"step '{owner.name}' is its own optimizer: remove `optimizer: {t.name}` (and "
                                      f"its options) from the recipe and set lr / weight_decay under `step:`")
            built = [t for t in built if t.slot != "optimizer"]
        return [self._offload_optimizer(self._precision_optimizer(t)) if t.slot == "optimizer" else t for t in built]

    def _precision_optimizer(self, t: Technique) -> Technique:
        """The optimizer run through `optim/precision.py` when weights are stored in 16 bits (master copy or
        stochastic rounding) or its state takes another dtype (`state_dtype`)."""
        policy = self.train.policy
        state_dtype = getattr(t.config, "state_dtype", None)
        master = self.train.master_weights == "fp32"
        if getattr(t.config, "layerwise", False):
            if master or state_dtype:
                raise ConfigError(f"optimizer '{t.name}' updates inside backward (layer-wise), where memfit keeps "
                                  f"no master copy or state_dtype; drop train.master_weights / state_dtype or use "
                                  f"a whole-step optimizer (layerwise: false)")
            return t  # 16-bit weights updated layer-wise round to nearest (LOMO: through an fp32 working copy)
        if not policy.true_low and state_dtype is None:
            return t
        from memfit.optim.precision import PrecisionTechnique

        return PrecisionTechnique(t, master_weights=master, true_low=policy.true_low)

    def _offload_optimizer(self, t: Technique) -> Technique:
        """The optimizer with `offload: disk`: its state in memory-mapped files (`optim/offload.py`)."""
        if getattr(t.config, "offload", "none") != "disk":
            return t
        from memfit.optim.offload import DiskOffloadTechnique
        from memfit.optim.precision import PrecisionTechnique

        if isinstance(t, PrecisionTechnique):
            raise ConfigError(f"optimizer.offload: disk runs the optimizer on fp32 (or bf16-mixed) weights with its "
                              f"own state dtype; precision {self.train.precision} / state_dtype step each parameter "
                              f"through an fp32 copy: drop one of them")
        return DiskOffloadTechnique(t)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.steps=50` -> (['train','steps'], 50); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. train.steps=50)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # `optimizer: adamw` + `optimizer.lr=...` -> mapping
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(path[:i + 1])}' holds the value {child!r}, not "
                                  f"a section of keys; set it directly, e.g. {'.'.join(path[:i + 1])}=VALUE")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one `ConfigError`."""
    if isinstance(source, dict):
        data = dict(source)
        where = "recipe"
    else:
        path = Path(source)
        data = _parse_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of keys (name, model, data, train, ...)")
        where = str(path)
    import copy

    data = apply_overrides(copy.deepcopy(data), list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_recipe_errors(where, exc)) from None


def _parse_yaml(path: Path) -> Any:
    """The YAML document in a recipe file; a missing, unreadable or non-YAML file is one `ConfigError`."""
    from memfit.data.io import read_utf8

    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise ConfigError(f"recipe {path} is a directory; name a recipe YAML file inside it{hint}")
    if not path.exists():
        raise ConfigError(f"recipe file {path} does not exist")
    text = read_utf8(path, "recipe", ConfigError)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None


def _recipe_errors(where: str, exc: ValidationError) -> str:
    """Readable lines; unknown keys name the allowed keys of the section they appear in."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if err["type"] == "extra_forbidden":
            section = _section_model(loc[:-1], err)
            allowed = ", ".join(section.model_fields) if section else "see the recipe docs"
            lines.append(f"{where}: unknown key '{'.'.join(loc)}'; allowed keys here: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {'.'.join(loc) or '(root)'}: {msg}")
    return "\n".join(lines)


def _section_model(loc: list[str], err: dict) -> type[BaseModel] | None:
    from memfit.data import config as data_config

    if not loc:
        return Recipe
    head = loc[0]
    if head == "data":
        for cls in (data_config.TextData, data_config.ClassificationData, data_config.ConllData):
            if len(loc) > 1 and loc[1] == cls.model_fields["kind"].default:
                return cls
        return None
    return {"model": ModelConfig, "train": TrainConfig}.get(head)
