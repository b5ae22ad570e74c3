"""Optimisers for the two kinds of parameters a two-tower model has.

- **Id tables** (user ids, history items, item ids: ``nn.Embedding(..., sparse=True)`` in
  ``towers/model.py``) grow with the number of users and items. A batch touches a few hundred of
  their rows, and backward hands over a row-sparse gradient holding only those. They are updated
  row by row, so a step costs in proportion to the batch, never to the table, and a row no batch
  touched is never moved (no decay, no momentum carrying it on).
- **Everything else** (the MLPs, the side-feature tables) is small and dense: AdamW.

Table optimisers (``--embedding-optimizer``):

- ``rowwise_adagrad`` (default): Adagrad with ONE accumulator per row, the mean of the row's squared
  gradients (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, what TorchRec trains its embedding tables with).
  Its state is one float per row: 20 MB at 5M rows, where Adam-style state would be two copies of
  the table (2.5 GB at 5M users x 64 dims).
- ``sparse_adam``: ``torch.optim.SparseAdam`` (lazy Adam: moments of touched rows only); two
  table-sized state tensors.
- ``adamw``: the tables as dense parameters of the one AdamW (every row updated every step). Kept
  only as the reference the others are measured against (benchmarks/scale.py, quality.py).

Torch has no row-wise Adagrad (``torch.optim.Adagrad`` accepts sparse gradients but keeps a full
table-sized accumulator), hence the small class below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from training.config import EMBEDDING_OPTIMIZERS


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row of a 2-D parameter.

    For every row ``i`` in the gradient (duplicates summed first)::

        g_i   <- g_i + weight_decay * w_i            (touched rows only)
        acc_i <- acc_i + mean_j(g_ij ** 2)
        w_i   <- w_i - lr * g_i / (sqrt(acc_i) + eps)

    Accepts sparse COO gradients (the rows a batch looked up) and dense ones (then every row counts
    as touched). ``state_dict``/``load_state_dict`` come from ``torch.optim.Optimizer``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, eps: float = 1e-8,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"row-wise Adagrad needs 2-D parameters (rows x dim), got {tuple(p.shape)}")
                self.state[p]["sum"] = torch.full((p.shape[0],), float(group["initial_accumulator_value"]),
                                                  dtype=torch.float32, device=p.device)  # (rows,)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                acc = self.state[p]["sum"]
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # one entry per row: repeated lookups summed
                    rows = grad.indices()[0]  # (R,)
                    values = grad.values()  # (R, D)
                else:
                    rows = torch.arange(p.shape[0], device=p.device)
                    values = grad
                if rows.numel() == 0:
                    continue
                if wd:
                    values = values + wd * p.index_select(0, rows)
                acc.index_add_(0, rows, values.float().pow(2).mean(dim=1))
                scale = acc.index_select(0, rows).sqrt_().add_(eps)  # (R,)
                p.index_add_(0, rows, (values / scale.unsqueeze(1)).to(p.dtype), alpha=-lr)
        return loss


def table_modules(*modules: nn.Module) -> list[nn.Embedding | nn.EmbeddingBag]:
    """The id tables of the towers: every ``nn.Embedding``/``nn.EmbeddingBag`` created ``sparse``."""
    return [m for root in modules for m in root.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


@dataclass
class Optimizers:
    """The dense AdamW and, unless the tables are dense too, the table optimiser; stepped together.

    Every group remembers its base learning rate, so a schedule sets ``base * factor`` on each.
    """

    dense: torch.optim.Optimizer
    tables: torch.optim.Optimizer | None
    table_params: list[nn.Parameter]

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.dense] + ([self.tables] if self.tables is not None else [])

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def set_lr_factor(self, factor: float) -> None:
        for opt in self.all:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict(),
                "tables": self.tables.state_dict() if self.tables is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state["dense"])
        if self.tables is not None:
            self.tables.load_state_dict(state["tables"])


def build_optimizers(modules: Sequence[nn.Module], *, kind: str, lr: float, table_lr: float,
                     weight_decay: float) -> Optimizers:
    """Split the parameters of ``modules`` (shared ones once) into id tables and the rest.

    ``kind="adamw"`` turns the tables dense (their modules' ``sparse`` flag off) and gives every
    parameter to the one AdamW, as the job did before the tables were sparse.
    """
    if kind not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"embedding optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, got {kind!r}")
    tables = table_modules(*modules)
    if kind == "adamw":
        for m in tables:
            m.sparse = False
        tables = []
    table_ids = {id(m.weight) for m in tables}
    table_params = [cast(nn.Parameter, w) for w in {id(m.weight): m.weight for m in tables}.values()]
    dense = [p for p in {id(p): p for m in modules for p in m.parameters()}.values() if id(p) not in table_ids]
    # fused: one kernel over every tensor (CPU and CUDA) instead of a Python loop of small ops per
    # tensor: 0.59 -> 0.15 ms a step for the towers' ~11 dense tensors
    adamw = torch.optim.AdamW(dense, lr=lr, weight_decay=weight_decay, fused=True)
    table_opt: torch.optim.Optimizer | None = None
    if table_params:
        if kind == "rowwise_adagrad":
            table_opt = RowWiseAdagrad(table_params, lr=table_lr, weight_decay=weight_decay)
        else:
            table_opt = torch.optim.SparseAdam(table_params, lr=table_lr)
    out = Optimizers(dense=adamw, tables=table_opt, table_params=table_params)
    for opt in out.all:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return out
