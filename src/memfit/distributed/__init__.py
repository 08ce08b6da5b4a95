"""Multi-process training on PyTorch's FSDP2 (see README.md in this folder): process groups and launching,
sharding a model, every memfit optimizer on sharded parameters, DCP checkpoints, per-rank memory."""
