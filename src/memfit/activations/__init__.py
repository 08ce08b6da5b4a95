"""The `activations` slot: techniques that change what forward saves and how loss and backward run.

They compose (the slot takes a list): checkpointing, CPU offload, compressed saved tensors (Mesa 8-bit,
S2A 4-bit), chunked cross-entropy, and StreamBP's sequence-chunked exact backprop.
"""
