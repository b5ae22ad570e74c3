"""The training job's view of its process group: one process is world size 1, torchrun gives more.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment), the job joins
the process group torchrun describes: gloo on the CPU, NCCL on CUDA, as many machines as torchrun's
``--nnodes``/rendezvous gives. Started any other way it is rank 0 of 1 and every collective below
is the identity, so there is one code path.

How the pieces are synchronised (what DistributedDataParallel does and does not do for us):

- dense parameters (MLPs, side-feature tables): DistributedDataParallel averages their gradients;
- id tables (row-sparse gradients, see training/optim.py): kept out of DDP and averaged here with
  ``dist.all_reduce`` on a gloo group. Gloo all-reduces sparse tensors (CPU and CUDA); NCCL does
  not ("NCCL does not support all_reduce with sparse tensors", ProcessGroupNCCL::allreduce_sparse;
  pytorch/pytorch#22400 is still open), so on CUDA the job opens a gloo group beside the NCCL one
  for them. Doing it the same way on both backends keeps one path, tested on the CPU;
- in-batch negatives: each rank's item vectors are gathered with
  ``torch.distributed.nn.functional.all_gather``, whose backward sums every rank's gradient back
  into the rank that produced the vector.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


class RankLostError(RuntimeError):
    """Another rank stopped answering (it died or was killed): this rank cannot go on."""

    user_facing = True


def is_collective_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (gloo: the connection closed; NCCL: the
    communicator aborted), as opposed to a bug in what this rank computed."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed", "Connection reset",
                                                                      "Broken pipe", "gloo", "NCCL"))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str | None = None
    _cpu_group: Any = field(default=None, repr=False)  # gloo: CPU tensors and sparse gradients
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(cls, device_type: str, timeout_s: float = 1800.0) -> Dist:
        """Join torchrun's process group when the environment names one with more than one rank."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        backend = "nccl" if device_type == "cuda" else "gloo"
        owns = False
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
            owns = True
        sparse_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
        log.info("rank %d of %d (%s, local rank %d)", rank, world, backend, local_rank)
        return cls(rank=rank, world=world, local_rank=local_rank, local_world=local_world, backend=backend,
                   _cpu_group=sparse_group, _owns_group=owns)

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def gather_with_grad(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all ranks), in rank order; gradients flow back."""
        if not self.active:
            return [t]
        from torch.distributed.nn.functional import all_gather

        # synchronous, with autograd: its backward sums every rank's gradient back into this rank's
        # tensor. (torch now points at the asynchronous functional all_gather_single instead; with it,
        # one 2-rank gloo run in six here died of SIGSEGV mid-epoch, a cause not pinned down.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
            return list(all_gather(t.contiguous()))

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape), in rank order; no gradient."""
        if not self.active:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self._group_for(t))
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; ``t`` is left alone)."""
        if not self.active:
            return t.clone()
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, group=self._group_for(out))
        return out

    def _group_for(self, t: torch.Tensor) -> Any:
        """NCCL reduces CUDA tensors only: counts and losses kept on the CPU go over the gloo group."""
        return self._cpu_group if t.device.type == "cpu" else None

    def max_int(self, value: int) -> int:
        return int(self.sum_or_max(torch.tensor([value], dtype=torch.long), "max")[0])

    def sum_or_max(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.active:
            return t.clone()
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self._group_for(out))
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self._cpu_group)

    def average_table_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the id tables' row-sparse gradients over ranks (DDP leaves them to us)."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                continue
            g = p.grad.coalesce() if p.grad.is_sparse else p.grad
            dist.all_reduce(g, group=self._cpu_group)
            p.grad = g / self.world
