"""memfit: train, fine-tune and run language models inside the memory you have.

memfit predicts the peak memory of each strategy by category (weights, gradients, optimizer state,
activations, KV cache), picks a plan that fits a budget, runs it, and measures where every byte went.
"""

from memfit.compat import quiet_import_noise
from memfit.errors import MemfitError

# torchao and bitsandbytes, pulled in by transformers / peft when installed, log expected CPU-machine messages at
# import; drop exactly those (memfit.compat.IMPORT_NOISE), nothing else they log
quiet_import_noise()

__version__ = "0.1.0"
__all__ = ["MemfitError", "__version__", "plan"]


def __getattr__(name: str):
    """`memfit.plan(model_or_config, task=..., budget=...)` (and `memfit.integrations`) load on first use."""
    if name in ("plan", "integrations"):
        import importlib

        return importlib.import_module(f"memfit.{name}")
    raise AttributeError(f"module 'memfit' has no attribute '{name}'")
