"""Adapters: train a few added parameters over a frozen base (LoRA, DoRA and other peft tuners, LST)."""
