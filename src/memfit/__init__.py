"""memfit: train, fine-tune and run language models inside the memory you have.

memfit predicts the peak memory of each strategy by category (weights, gradients, optimizer state,
activations, KV cache), picks a plan that fits a budget, runs it, and measures where every byte went.
"""

import logging

from memfit.errors import MemfitError

# torchao (pulled in by transformers when installed) logs its missing GPU kernels at import on CPU machines
logging.getLogger("torchao").setLevel(logging.ERROR)
# ... and registers its enums with torch's pytree, which warns that this is deprecated (not the user's concern)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["MemfitError", "__version__"]
