"""Every technique by slot and name, imported lazily so a run pays only for what it uses.

Adding a technique = one file in its family package + one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from memfit.errors import ConfigError
from memfit.techniques.base import Technique

SLOTS: dict[str, dict[str, str]] = {
    "weights": {
        "int8": "memfit.weights.int8:Int8Weights",
        "int4": "memfit.weights.int4:Int4Weights",
        "nf4": "memfit.weights.nf4:NF4Weights",
        "dfloat11": "memfit.weights.dfloat11:DFloat11Weights",
        "bitstack": "memfit.weights.bitstack:BitStackWeights",
        "awq": "memfit.weights.awq:AWQWeights",
    },
    "adapter": {
        "lora": "memfit.adapters.lora:LoRA",
        "dora": "memfit.adapters.dora:DoRA",
        "peft": "memfit.adapters.peft_generic:PeftGeneric",
        "qlora": "memfit.weights.qlora:QLoRA",
        "peqa": "memfit.weights.peqa:PEQA",
        "lisa": "memfit.sampling.lisa:LISA",
        "owlore": "memfit.sampling.owlore:OwLore",
        "badam": "memfit.sampling.badam:BAdam",
        "ist": "memfit.sampling.ist:IST",
        "lst": "memfit.adapters.lst:LST",
        "unipt": "memfit.adapters.unipt:UniPT",
        "sherl": "memfit.adapters.sherl:SHERL",
        "slimfit": "memfit.sampling.slimfit:SlimFit",
        "meft": "memfit.adapters.meft:MEFT",
        "switchlora": "memfit.adapters.switchlora:SwitchLoRA",
        "sketchtune": "memfit.weights.sketch:SketchTune",
    },
    "activations": {
        "checkpointing": "memfit.activations.checkpointing:Checkpointing",
        "chunked_ce": "memfit.activations.chunked_ce:ChunkedCE",
        "streambp": "memfit.activations.streambp:StreamBP",
        "offload": "memfit.activations.offload:Offload",
        "mesa": "memfit.activations.mesa:Mesa",
        "s2a": "memfit.activations.s2a:S2A",
        "wta_crs": "memfit.activations.wta_crs:WTACRS",
    },
    "optimizer": {
        "adamw": "memfit.optim.adamw:AdamWTechnique",
        "galore": "memfit.optim.galore:GaLoreTechnique",
        "galore_8bit": "memfit.optim.galore:GaLore8bitTechnique",
        "q_galore": "memfit.optim.q_galore:QGaLoreTechnique",
        "apollo": "memfit.optim.apollo:APOLLOTechnique",
        "apollo_mini": "memfit.optim.apollo:APOLLOMiniTechnique",
        "adam_mini": "memfit.optim.adam_mini:AdamMiniTechnique",
        "adamw_8bit": "memfit.optim.adamw_8bit:AdamW8bitTechnique",
        "natural_galore": "memfit.optim.natural_galore:NaturalGaLoreTechnique",
        "frugal": "memfit.optim.frugal:FRUGALTechnique",
        "scale": "memfit.optim.scale:SCALETechnique",
        "sgd": "memfit.optim.sgd:SGDTechnique",
        "lomo": "memfit.optim.lomo:LomoTechnique",
        "adalomo": "memfit.optim.adalomo:AdaLomoTechnique",
    },
    "step": {
        "backprop": "memfit.train.step:BackpropStep",
        "mezo": "memfit.zo.mezo:MeZOStep",
        "zo-sign": "memfit.zo.zo_sign:ZOSignStep",
        "zo-momentum": "memfit.zo.zo_momentum:ZOMomentumStep",
        "zo-adam": "memfit.zo.zo_adam:ZOAdamStep",
        "forward-grad": "memfit.zo.forward_grad:ForwardGradStep",
        "zo-block": "memfit.zo.zo_block:ZOBlockStep",
        "zo2": "memfit.zo.zo2:ZO2Step",
    },
    "kv": {
        "full": "memfit.kv.full:FullKV",
        "streaming_llm": "memfit.kv.streaming_llm:StreamingLLM",
        "h2o": "memfit.kv.h2o:H2O",
        "snapkv": "memfit.kv.snapkv:SnapKV",
        "keyformer": "memfit.kv.keyformer:Keyformer",
        "pyramid": "memfit.kv.pyramid:PyramidKV",
        "adakv": "memfit.kv.adakv:AdaKV",
        "kivi": "memfit.kv.kivi:KIVI",
        "gear": "memfit.kv.gear:GEAR",
    },
}

MULTI_SLOTS = ("activations",)
"""Slots that take a list of techniques; every other slot takes at most one."""


def available(slot: str) -> list[str]:
    return sorted(SLOTS[slot])


def technique_class(slot: str, name: str) -> type[Technique]:
    if slot not in SLOTS:
        raise ConfigError(f"unknown technique slot '{slot}'; slots are: {', '.join(SLOTS)}")
    if name not in SLOTS[slot]:
        choices = ", ".join(available(slot)) or "(none yet)"
        raise ConfigError(f"unknown {slot} technique '{name}'; choose one of: {choices}")
    module_name, class_name = SLOTS[slot][name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_technique(slot: str, spec: str | dict[str, Any]) -> Technique:
    """Build a technique from a recipe value: a bare name or a mapping with `name` and its options."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"'{slot}' must be a technique name or a mapping with a 'name' key, got {spec!r}")
    cls = technique_class(slot, spec["name"])
    try:
        config = cls.Config(**spec)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(f"{slot} '{spec['name']}'", exc, cls.Config)) from None
    return cls(config)


def format_validation_error(where: str, exc: ValidationError, model: Any) -> str:
    """One readable line per problem, naming the allowed keys when a key is unknown."""
    lines = []
    allowed = ", ".join(getattr(model, "model_fields", {}))
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{loc}'; allowed keys: {allowed}")
        else:
            lines.append(f"{where}: {loc}: {err['msg']}")
    return "\n".join(lines)
