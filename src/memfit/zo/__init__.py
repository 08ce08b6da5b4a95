"""Zeroth-order training: gradient-free fine-tuning at inference memory (MeZO and the ZO-Bench family)."""
