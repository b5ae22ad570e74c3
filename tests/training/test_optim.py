"""The id tables learn row-sparse: a step moves only the rows its batch touched, and costs that much."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.optim import RowWiseAdagrad, build_optimizers, table_modules


def _touch(emb: nn.Embedding, rows: list[int]) -> None:
    emb(torch.tensor(rows)).pow(2).sum().backward()


def test_rowwise_adagrad_moves_only_the_touched_rows_by_the_rowwise_rule() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = RowWiseAdagrad(emb.parameters(), lr=0.1, weight_decay=0.01)
    _touch(emb, [1, 3, 3])  # row 3 twice: its gradients add up
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    opt.step()
    after = emb.weight.detach()
    untouched = [0, 2, 4, 5]
    assert torch.equal(after[untouched], before[untouched])  # no decay, no momentum on other rows
    for row, times in ((1, 1), (3, 2)):
        g = 2 * times * before[row] + 0.01 * before[row]  # d/dw sum(w^2) per lookup, plus weight decay
        acc = g.pow(2).mean()
        expect = before[row] - 0.1 * g / (acc.sqrt() + 1e-8)
        torch.testing.assert_close(after[row], expect)
    state = opt.state[emb.weight]["sum"]
    assert state.shape == (6,)  # one float per row, not a table-sized copy
    assert state[[0, 2, 4, 5]].eq(0).all() and state[[1, 3]].gt(0).all()


def test_rowwise_adagrad_state_round_trips_and_continues_identically() -> None:
    def run(steps_before_save: int, total: int) -> torch.Tensor:
        torch.manual_seed(1)
        emb = nn.Embedding(8, 3, sparse=True)
        opt = RowWiseAdagrad(emb.parameters(), lr=0.05)
        batches = [[0, 1], [1, 2, 5], [5, 7], [2, 2]]
        for s in range(total):
            if s == steps_before_save:
                saved = ({k: v.clone() for k, v in emb.state_dict().items()}, opt.state_dict())
                emb = nn.Embedding(8, 3, sparse=True)
                opt = RowWiseAdagrad(emb.parameters(), lr=0.05)
                emb.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
            opt.zero_grad()
            _touch(emb, batches[s % len(batches)])
            opt.step()
        return emb.weight.detach()

    assert torch.equal(run(99, 6), run(3, 6))


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "sparse_adam"])
def test_tables_go_to_the_sparse_optimiser_the_rest_to_adamw(kind: str) -> None:
    tables = nn.Embedding(100, 8, sparse=True)
    feature = nn.Embedding(5, 8)  # a small dense side-feature table
    mlp = nn.Linear(16, 4)
    model = nn.ModuleDict({"t": tables, "f": feature, "m": mlp})
    opts = build_optimizers([model], kind=kind, lr=1e-3, table_lr=0.1, weight_decay=0.0)
    assert table_modules(model) == [tables] and opts.table_params == [tables.weight]
    dense_ids = {id(p) for g in opts.dense.param_groups for p in g["params"]}
    assert id(tables.weight) not in dense_ids and {id(feature.weight), id(mlp.weight)} <= dense_ids
    assert opts.tables is not None and opts.tables.param_groups[0]["lr"] == 0.1
    opts.set_lr_factor(0.5)
    assert opts.tables.param_groups[0]["lr"] == 0.05 and opts.dense.param_groups[0]["lr"] == 5e-4

    before = tables.weight.detach().clone()
    out = mlp(torch.cat([tables(torch.tensor([3, 7])), feature(torch.tensor([1, 2]))], dim=1))
    opts.zero_grad()
    out.sum().backward()
    opts.step()
    moved = (tables.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [3, 7]


def test_adamw_reference_makes_the_tables_dense() -> None:
    tables = nn.Embedding(10, 4, sparse=True)
    opts = build_optimizers([tables], kind="adamw", lr=1e-3, table_lr=1e-3, weight_decay=0.0)
    assert opts.tables is None and not tables.sparse
    _touch(tables, [1])
    assert tables.weight.grad is not None and not tables.weight.grad.is_sparse


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="embedding optimizer must be one of"):
        build_optimizers([nn.Linear(2, 2)], kind="sgd", lr=1e-3, table_lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="2-D"):
        RowWiseAdagrad([nn.Parameter(torch.zeros(3))])
