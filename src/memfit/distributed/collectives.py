"""Moving one dim-0-sharded tensor between its shards and one owner rank (the matrix step's gather and scatter).

FSDP2 shards dim 0 like `torch.chunk`: every rank but the last ones holds ceil(rows / N) rows, the tail may hold
fewer or none. `gather`/`scatter` need equal-sized pieces, so each piece travels padded to that chunk.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of the rows `rank` holds under FSDP2's dim-0 sharding."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def check_layout(param: DTensor, world: int, rank: int) -> None:
    """Fail loudly if FSDP2's shard of `param` is not the `torch.chunk` row range this module assumes."""
    start, end = row_range(param.shape[0], world, rank)
    local = param.to_local()
    if tuple(local.shape) != (end - start, *param.shape[1:]):
        raise RuntimeError(f"FSDP2 shard of shape {tuple(local.shape)} on rank {rank}/{world} for a parameter of "
                           f"shape {tuple(param.shape)}; expected rows [{start}, {end}) (torch {torch.__version__})")


def _padded(local: torch.Tensor, chunk: int) -> torch.Tensor:
    if local.shape[0] == chunk:
        return local.contiguous()
    out = local.new_zeros((chunk, *local.shape[1:]))
    out[: local.shape[0]] = local
    return out


class RowExchange:
    """Gathers whole tensors to their owners and scatters their rows back, a window of tensors at a time
    (each with a different owner, so the owners' work runs in parallel)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, items: list[tuple[torch.Tensor, int, int]]) -> dict[int, torch.Tensor]:
        """`items`: (local rows, global rows, owner group rank). Returns {index: full tensor} for owned items."""
        works, owned = [], {}
        for index, (local, rows, owner) in enumerate(items):
            chunk = math.ceil(rows / self.world)
            pieces = None
            if owner == self.rank:  # receive straight into one padded buffer (no concatenation copy)
                full = local.new_empty((chunk * self.world, *local.shape[1:]))
                pieces = list(full.split(chunk))
                owned[index] = full[:rows]
            works.append(dist.gather(_padded(local, chunk), pieces, group=self.group, group_dst=owner,
                                     async_op=True))
        for work in works:
            work.wait()
        return owned

    def scatter(self, items: list[tuple[torch.Tensor, int, int]], full: dict[int, torch.Tensor]) -> None:
        """Write each owner's `full[index]` rows back into every rank's `local` (items as in `gather`)."""
        works, receive = [], []
        for index, (local, rows, owner) in enumerate(items):
            chunk = math.ceil(rows / self.world)
            pieces = None
            if owner == self.rank:
                pieces = list(_padded(full[index], chunk * self.world).split(chunk))
            out = local if local.shape[0] == chunk and local.is_contiguous() else local.new_empty(
                (chunk, *local.shape[1:]))
            works.append(dist.scatter(out, pieces, group=self.group, group_src=owner, async_op=True))
            receive.append((local, out))
        for work in works:
            work.wait()
        for local, out in receive:
            if out is not local:
                local.copy_(out[: local.shape[0]])
