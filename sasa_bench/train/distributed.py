"""torchrun support: process group from the environment, DDP, rank-0-only side effects.

Launch: ``torchrun --nproc-per-node N -m sasa_bench train ...`` (multi-node: torchrun's usual
``--nnodes/--rdzv-*`` flags). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
we initialise NCCL on GPUs and gloo on CPU. ``--batch-size`` is the global batch, split evenly
over the processes. BatchNorm statistics stay per process (as on the paper's TPUs) unless
``sync_bn`` is set (CUDA only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sasa_bench.errors import SasaError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group (so we tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> DistEnv:
    """Read torchrun's environment; initialise the process group once (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        except (ValueError, RuntimeError) as e:
            raise SasaError(f"cannot initialise torch.distributed ({backend}): {str(e).splitlines()[0]}") from None
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, device, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: DistEnv, sync_bn: bool) -> torch.nn.Module:
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        if env.device.type != "cuda":
            raise SasaError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, broadcast_buffers=True)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def average_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Average the floating buffers (BN running stats) over the ranks, so every rank (and the
    checkpoint) holds the same statistics; called before each evaluation and at the end."""
    if not env.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(env.world)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value on every rank (e.g. the timestamped default run directory)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
