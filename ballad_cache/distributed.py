"""torchrun support: one process by default; NCCL on GPUs and gloo on CPU when WORLD_SIZE > 1."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    """Rank and world size of this process; rank 0 is the one that writes shared files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes manifests, configs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device.

    Returns:
        The context and the device this rank uses (cuda:LOCAL_RANK on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local), device


def cleanup_distributed(finished: bool = False) -> None:
    """Leave the process group, if one was joined; after a `finished` run every rank first waits for the others,
    so no rank tears gloo down while another still talks to it (which aborted a rank at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """`init_distributed` for the block, `cleanup_distributed` after it, whatever happens (a barrier first when
    the block finished: a rank that failed does not wait for the others)."""
    finished = False
    try:
        yield init_distributed(device)
        finished = True
    finally:
        cleanup_distributed(finished)
