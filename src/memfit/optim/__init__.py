"""Optimizer-state reduction: `torch.optim.Optimizer` subclasses, each one file citing its paper."""
