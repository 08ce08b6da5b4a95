"""OwLore — Li et al. 2024, "OwLore: Outlier-weighted Layerwise Sampled Low-Rank Projection for Memory-Efficient
LLM Fine-tuning".

LISA's schedule, but layer l is sampled with probability proportional to its outlier ratio D_l: the share of
weights whose outlier score A_ij = |W_ij|·||X_j||_2 exceeds `threshold` times the mean score of its matrix (the
heavy-tailed layers, which OwLore finds most worth training). ||X_j|| are input-feature norms over a few
calibration batches of the run's training data; with no data the scores use |W_ij| alone. OwLore's low-rank
projection inside sampled layers is the optimizer slot's job: combine with `optimizer: {name: galore}`.
Recipe: `adapter: {name: owlore, layers: 2, interval: 20, threshold: 5}`.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from memfit.sampling.layers import LayerSampler, LayerSamplerConfig, seeded_generator
from memfit.techniques.base import Context


class OwLoreConfig(LayerSamplerConfig):
    threshold: float = Field(5.0, gt=0, description="M: an outlier exceeds M x the matrix's mean score")
    calib_batches: int = Field(4, ge=0, description="training batches used for input norms (0 = weights only)")
    calib_batch_size: int = Field(8, ge=1)


def outlier_ratio(weight: torch.Tensor, input_norm: torch.Tensor | None, threshold: float) -> tuple[int, int]:
    """(outliers, total) of one linear weight (out, in) under OWL's score |W|·||X||."""
    score = weight.detach().abs().float()
    if input_norm is not None:
        score = score * input_norm.float().unsqueeze(0)
    return int((score > threshold * score.mean()).sum()), score.numel()


def calibration_batches(ctx: Context, n: int, batch_size: int) -> list[dict]:
    """Up to `n` collated batches from the run's training data (empty when the run carries none)."""
    data = ctx.data
    train, collate = getattr(data, "train", None), getattr(data, "collate", None)
    if n == 0 or train is None or collate is None:
        return []
    total = min(len(train), n * batch_size)
    return [collate([train[j] for j in range(i, min(i + batch_size, total))]) for i in range(0, total, batch_size)]


class OwLore(LayerSampler):
    name = "owlore"
    Config = OwLoreConfig

    def prepare(self, ctx: Context, layers: dict[int, list]) -> None:
        model = ctx.model
        linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        norms: dict[str, torch.Tensor] = {}
        batches = calibration_batches(ctx, self.config.calib_batches, self.config.calib_batch_size)
        if batches:
            def hook(name):
                def fn(_mod, args):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    sq = (x * x).sum(0)
                    norms[name] = norms.get(name, 0) + sq
                return fn

            handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for b in batches:
                        model(**{k: v.to(ctx.device) for k, v in b.items() if k != "labels"})
            finally:
                for h in handles:
                    h.remove()
                model.train(was_training)
            if not norms:
                from memfit.compat import fail

                raise fail("adapter 'owlore': the calibration forward reached no linear layer's pre-hook",
                           "each nn.Linear's forward pre-hook to fire during the model's forward", ("torch",))
        ratios = []
        for i in sorted(layers):
            out = tot = 0
            for pname, p in layers[i]:
                mod = pname.rsplit(".", 1)[0]
                if pname.endswith(".weight") and mod in linears:
                    norm = norms[mod].sqrt() if mod in norms else None
                    o, t = outlier_ratio(p, norm, self.config.threshold)
                    out, tot = out + o, tot + t
            ratios.append(out / tot if tot else 0.0)
        r = torch.tensor(ratios, dtype=torch.float64)
        self.probabilities = (r / r.sum() if r.sum() > 0 else torch.full_like(r, 1 / len(r))).tolist()

    def select(self, k: int, n_layers: int) -> list[int]:
        probs = torch.tensor(self.probabilities, dtype=torch.float64)
        picked = torch.multinomial(probs, self.config.layers, replacement=False, generator=seeded_generator(self.seed, k))
        return sorted(picked.tolist())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "probabilities": list(getattr(self, "probabilities", []))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("probabilities"):
            self.probabilities = list(state["probabilities"])
