"""Training in several processes with PyTorch DistributedDataParallel, launched by ``torchrun``.

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) nothing here communicates and
training runs in one process on the CPU, exactly as before. Under torchrun each process joins the
process group: ``nccl`` on its own GPU when CUDA is available, ``gloo`` on the CPU otherwise.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

# Rank 0 alone saves checkpoints and evaluates while the others wait at a barrier.
TIMEOUT = timedelta(hours=2)


def setup() -> torch.device:
    """Join torchrun's process group (if launched by torchrun) and return this process's device."""
    if "WORLD_SIZE" not in os.environ or is_initialized():
        return device()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"torchrun started process {local_rank} on this machine but only "
                               f"{torch.cuda.device_count()} GPU(s) are visible: lower --nproc_per_node.")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def device() -> torch.device:
    """Its own GPU for a process of an nccl group; the CPU otherwise (a plain run has always trained there)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """The process that writes checkpoints, the exported model and the progress bars."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """The seed of this process's own random draws: ``seed`` itself in one process, one stream per rank else."""
    if world_size() == 1:
        return seed
    return int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0])


def shard(batch: Sequence[T] | np.ndarray) -> np.ndarray:
    """This rank's contiguous share of a batch that every rank drew identically (all of it in one process)."""
    return np.array_split(np.asarray(batch), world_size())[rank()]


def wrap(module: nn.Module) -> nn.Module:
    """``module`` in DDP when several processes train (DDP then averages its gradients), else ``module``.

    DDP also copies rank 0's weights to every rank when it wraps, so all ranks start alike. Every
    trainable parameter of what the stages wrap takes part in each forward, so DDP need not search for
    unused ones.
    """
    if world_size() == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    here = device()
    return DistributedDataParallel(module, device_ids=[here.index] if here.type == "cuda" else None,
                                   find_unused_parameters=False)


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: DDP sends them before each forward, so after
    the last one every rank holds statistics updated by its own batch."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def check_in_sync(modules: dict[str, nn.Module], what: str) -> str:
    """Stop unless every rank holds the same weights (and configs); return their digest.

    Computed afresh (no cached fingerprint) because it verifies what training just did.
    """
    digest = hashlib.sha256()
    for name, module in sorted(modules.items()):
        digest.update(f"{name}:{getattr(module, 'config', '')!r}".encode())
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = digest.hexdigest()[:16]
    if world_size() == 1:
        return mine
    every: list[str] = [""] * world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        raise RuntimeError(f"The processes hold different {what} (weight digests by rank: {every}): "
                           "distributed training went out of step.")
    if is_main():
        print(f"{what}: identical in all {world_size()} processes (digest {mine})", flush=True)
    return mine
