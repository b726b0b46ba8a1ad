"""Process-group plumbing for meta-training: one process, or many launched by ``torchrun``.

``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) makes
:func:`setup` initialise the default process group (gloo for CPU tensors, NCCL for CUDA); without those variables
everything degenerates to no-ops on a single process. Only the helpers the meta-trainer needs live here.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import WorkbenchError


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size, and whether this module opened the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns_task(self, index: int) -> bool:
        """Tasks are dealt round-robin: task ``i`` runs on rank ``i % world_size``."""
        return index % self.world_size == self.rank

    # ------------------------------------------------------------------------------------------- collectives
    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, step: Callable[[], Any]) -> Any:
        """``step()`` on rank 0 only (what touches the run store), its result given to every rank; a WorkbenchError
        it raises is raised on every rank alike, so all leave together instead of some waiting at a collective."""
        payload: Any = None
        if self.is_main:
            try:
                payload = ("ok", step())
            except WorkbenchError as exc:
                payload = ("error", str(exc))
        payload = self.broadcast(payload)
        if payload[0] == "error":
            raise WorkbenchError(payload[1])
        return payload[1]

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` as a list on rank 0 (None elsewhere). Tensors should be on the CPU."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment, (0, 1, 0) without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise WorkbenchError(
            "RANK / WORLD_SIZE / LOCAL_RANK must be integers; launch with torchrun or unset them"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise WorkbenchError(f"RANK={rank} is not valid for WORLD_SIZE={world}; launch with torchrun")
    return rank, world, local


def setup(device_type: str) -> DistContext:
    """Join (or open) the default process group when launched by torchrun; a single-process context otherwise."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), env_world()[2], dist.get_backend(), False)
    rank, world, local = env_world()
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise WorkbenchError("this PyTorch build has no torch.distributed; run a single process (no torchrun)")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise WorkbenchError(
            "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with "
            "`torchrun --nproc_per_node=N -m workbench meta-train ...`"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistContext(rank, world, local, backend, True)


def shutdown(ctx: DistContext, drop: Optional[Callable[[], None]] = None, clean: bool = True) -> None:
    """Leave the process group the way gloo needs after backward passes: drop models, collect, barrier, destroy.

    Without this sequence an occasional gloo process crashes at interpreter exit. ``drop`` releases the caller's
    references to its models (and autograd graphs) first. ``clean=False`` (after an error that only this rank saw)
    skips the barrier, which the other ranks would never reach.
    """
    if drop is not None:
        drop()
    gc.collect()
    if not ctx.owns_group or not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


__all__ = ["DistContext", "env_world", "setup", "shutdown"]
