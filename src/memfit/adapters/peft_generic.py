"""Any other `peft` tuner by its peft type (IA3, LoHa, LoKr, VeRA, AdaLoRA, ...): Mangrulkar et al. 2022,
"PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods".

Recipe: `adapter: {name: peft, method: IA3, target: [k_proj, v_proj, down_proj], options: {feedforward_modules:
[down_proj]}}`. `options` go to the peft config unchanged; the estimate comes from peft itself (see peft_tuner).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from memfit.adapters.peft_tuner import PeftTuner, PeftTunerConfig
from memfit.errors import ConfigError


class PeftGenericConfig(PeftTunerConfig):
    method: str = Field(description="peft's PeftType, e.g. LORA, IA3, LOHA, LOKR, VERA")
    options: dict[str, Any] = Field(default_factory=dict)


class PeftGeneric(PeftTuner):
    name = "peft"
    Config = PeftGenericConfig

    def peft_config(self, target_modules: list[str], task_type: str | None, save: list[str] | None):
        import peft

        method = self.config.method.upper()
        if method not in peft.PeftType.__members__:
            raise ConfigError(f"adapter peft: unknown method '{self.config.method}'; peft knows: "
                              f"{', '.join(peft.PeftType.__members__)}")
        fields: dict[str, Any] = {"peft_type": method, "target_modules": list(target_modules), **self.config.options}
        if task_type is not None:
            fields["task_type"] = task_type
        if save is not None:
            fields["modules_to_save"] = save
        try:
            return peft.get_peft_config(fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"adapter peft ({method}): {str(exc).splitlines()[0]}") from None
