"""The training job's view of its process group: one process is world size 1, torchrun gives more.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment), the job joins
the process group torchrun describes: gloo on the CPU, NCCL on CUDA, as many machines as torchrun's
``--nnodes``/rendezvous gives. Started any other way it is rank 0 of 1 and every collective below
is the identity, so there is one code path.

How the pieces are synchronised (what DistributedDataParallel does and does not do for us):

- dense parameters (MLPs, side-feature tables): DistributedDataParallel averages their gradients;
- id tables (row-sparse gradients, see training/optim.py): kept out of DDP and averaged in
  ``average_table_grads``: every table's touched rows and their values go out in one
  ``all_gather`` of a flat dense buffer and each rank sums what it receives. A dense buffer also
  travels over NCCL, which cannot all-reduce sparse tensors (ProcessGroupNCCL::allreduce_sparse;
  pytorch/pytorch#22400); gloo can, but takes several round trips per table to do it;
- in-batch negatives: only the positives' row numbers are gathered (``gather``), and every rank
  embeds the global candidate list itself; the item tower's gradients then flow on every rank and
  are averaged with the rest.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
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
    _cpu_group: Any = field(default=None, repr=False)  # gloo: CPU tensors (counts, losses) under NCCL too
    _owns_group: bool = field(default=False, repr=False)
    _grad_rows: list[int] = field(default_factory=list, repr=False)  # average_table_grads' row budget per table

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
        cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
        log.info("rank %d of %d (%s, local rank %d)", rank, world, backend, local_rank)
        return cls(rank=rank, world=world, local_rank=local_rank, local_world=local_world, backend=backend,
                   _cpu_group=cpu_group, _owns_group=owns)

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape), in rank order; no gradient."""
        return self.gather_soon(t)()

    def gather_soon(self, t: torch.Tensor) -> Any:
        """``gather`` started now and finished in the background: returns a function that waits
        for it and gives the list. Issued a step ahead, its round trip overlaps that step's work."""
        if not self.active:
            return lambda: [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        work = dist.all_gather(out, t.contiguous(), group=self._group_for(t), async_op=True)

        def result() -> list[torch.Tensor]:
            work.wait()
            return out
        return result

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

    @staticmethod
    def _long_slots(n: int, dtype: torch.dtype) -> int:
        """Slots of ``dtype`` that hold ``n`` int64s (row numbers and counts ride in the value buffer)."""
        return n * 8 // dtype.itemsize

    def _gather_rows(self, grads: list[torch.Tensor], need: list[int], budget: list[int]) -> list[torch.Tensor]:
        """One all_gather of [row counts; per table: values and row numbers, padded or cut to its
        budget] from every rank."""
        dtype = grads[0].dtype
        parts = [torch.tensor(need, dtype=torch.long, device=grads[0].device).view(dtype)]
        for g, b in zip(grads, budget, strict=True):
            rows, vals = g.indices()[0][:b], g.values()[:b]
            pad = b - rows.shape[0]
            parts.append(torch.nn.functional.pad(vals, (0, 0, 0, pad)).reshape(-1))
            # rows as raw bytes in the value dtype's buffer (-1 marks padding); all_gather only copies
            parts.append(torch.cat([rows, rows.new_full((pad,), -1)]).view(dtype))
        return self.gather(torch.cat(parts))

    def average_table_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the id tables' row-sparse gradients over ranks (DDP leaves them to us).

        Every table's rows and values travel in ONE ``all_gather`` of a flat buffer, and each rank
        sums what it received. all_gather wants one length from every rank: each table has a row
        budget that every rank pads to, kept from step to step and raised (1/8 above the largest
        count, on every rank alike since all see the same counts) in the rare step where some rank
        had more rows than it, which then sends again. A step used to start with an all-reduce of
        the counts instead: one more round trip, 1-2 ms over gloo on the benchmark machine. Gloo's
        own sparse all-reduce exchanges sizes, indices and values per table (3+ round trips each):
        6.5 ms for 4k rows of 64 on two local ranks, against 2.2 ms for one all_gather of the same
        bytes (a standalone two-rank script when this was written; not a BENCHMARKS.md figure).
        Dense gradients (and mixed dtypes) take the plain all-reduce.
        """
        if not self.active:
            return
        import torch.distributed as dist

        live = [p for p in params if p.grad is not None]
        sparse = [p for p in live if p.grad is not None and p.grad.is_sparse]
        if len(sparse) != len(live) or len({p.dtype for p in sparse}) > 1:
            for p in live:
                assert p.grad is not None
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad
                dist.all_reduce(g, group=self._group_for(g) if not g.is_sparse else self._cpu_group)
                p.grad = g / self.world
            return
        if not sparse:
            return
        grads = [p.grad.coalesce() for p in sparse if p.grad is not None]
        dtype = grads[0].dtype
        need = [g.indices().shape[1] for g in grads]
        if len(self._grad_rows) != len(grads):
            self._grad_rows = [0] * len(grads)
        out = self._gather_rows(grads, need, self._grad_rows)
        # every rank's row counts lead its buffer; a rank with more rows than the budget sent only
        # the budget, so every rank sees that, raises the same budget and sends again
        head = self._long_slots(len(grads), dtype)
        counts = torch.stack([o[:head].view(torch.long) for o in out])  # (world, tables)
        most = counts.amax(0).tolist()
        if any(n > b for n, b in zip(most, self._grad_rows, strict=True)):
            self._grad_rows = [max(b, n + n // 8) for n, b in zip(most, self._grad_rows, strict=True)]
            out = self._gather_rows(grads, need, self._grad_rows)
        at = head
        for p, g, n in zip(sparse, grads, self._grad_rows, strict=True):
            width = g.values().shape[1]
            nv, ni = n * width, self._long_slots(n, dtype)
            vals = torch.cat([o[at:at + nv].view(n, width) for o in out])
            rows = torch.cat([o[at + nv:at + nv + ni].view(torch.long) for o in out])
            at += nv + ni
            keep = rows >= 0
            summed = torch.sparse_coo_tensor(rows[keep].unsqueeze(0), vals[keep], g.shape,
                                             check_invariants=False).coalesce()  # rows of our own tables
            p.grad = summed / self.world
