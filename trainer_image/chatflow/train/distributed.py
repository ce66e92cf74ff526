"""The process group and this process's place in it.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process; in a Kubeflow PyTorchJob pod
torchrun itself reads PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
PET_MASTER_PORT (the operator's RANK there is a node rank, which torchrun replaces).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Place:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Place:
    """Join the process group: NCCL on GPUs, gloo on CPU (DS_ACCELERATOR=cpu)."""
    use_gpu = torch.cuda.is_available()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not use_gpu:
        _skip_shm_comm_build()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    return Place(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory op at start.

    The op needs a C++ compiler at run time and serves only inference all-reduce; training on CPU
    uses gloo collectives. `deepspeed.comm` re-exports `torch`, hence the lookup via sys.modules.
    """
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks (float64 on CPU: counts stay exact)."""
    total = values.detach().to(torch.float64).cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
    return total.cpu()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
