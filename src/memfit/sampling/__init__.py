"""Layer sampling: train a changing subset of layers (LISA, OwLore, IST, BAdam)."""
