"""Process groups and launching: one process per device, started by `torchrun` (or its library API).

Every rank reads the torchrun environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
joins one process group — NCCL when CUDA is available, gloo on CPU — and builds a 1-D device mesh over all ranks
(the mesh `fully_shard` shards on). `launch_command` is the `torchrun` line behind `memfit ... --nproc N`;
`spawn` runs a picklable function on N local ranks with the same environment (tests, benchmarks).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from memfit.errors import ConfigError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the job: rank, world size, its device and the data-parallel mesh."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """True in a process started by torchrun / `spawn` (so a CLI must not launch again)."""
    return all(key in os.environ for key in TORCHRUN_ENV)


def default_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join (or reuse) the default process group from the torchrun environment; one rank per device."""
    missing = [key for key in TORCHRUN_ENV if key not in os.environ]
    if missing:
        raise ConfigError(f"distributed run without the torchrun environment ({', '.join(missing)} unset); "
                          "start it with `torchrun --nproc_per_node N -m memfit ...` or `memfit ... --nproc N`")
    local_rank = int(os.environ["LOCAL_RANK"])
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                              "use --nproc <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    backend = default_backend(device.type)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    world = dist.get_world_size()
    if world != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"process group has {world} ranks but WORLD_SIZE={os.environ['WORLD_SIZE']}")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistContext(dist.get_rank(), world, local_rank, device, backend, mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch_command(argv: list[str], nproc: int, module: str = "memfit") -> list[str]:
    """The `torchrun` command that runs `python -m <module> <argv>` on `nproc` local ranks."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *argv]


def launch(argv: list[str], nproc: int, module: str = "memfit") -> int:
    """Run `python -m <module> <argv>` on `nproc` local ranks as `launch_command` would (torch's elastic agent,
    in this process) and wait; returns 0, or the failed rank's exit code after one line naming it (each rank has
    printed its own error already, so torchrun's traceback of the agent is left out)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"memfit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", local_addr="localhost")
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"rank {rank} of {nproc} failed with exit code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(*args)` on `nproc` local ranks with torchrun's environment; return each rank's result in rank order.

    Uses torch's elastic launcher (what `torchrun` runs), so `fn` sees exactly what a torchrun worker sees;
    `fn` must be importable (module level) because workers are started with the `spawn` method."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"memfit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.05,
                          start_method="spawn", local_addr="localhost")
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        results = elastic_launch(config, fn)(*args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [results[rank] for rank in range(nproc)]
