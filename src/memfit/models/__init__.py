"""Models: Llama-architecture presets built from config, and HF models loaded from local paths."""

from memfit.models.load import ModelBundle, load_model, load_tokenizer, resolve_named_model
from memfit.models.presets import PRESETS, build_llama, llama_config

__all__ = ["PRESETS", "ModelBundle", "build_llama", "llama_config", "load_model", "load_tokenizer", "resolve_named_model"]
