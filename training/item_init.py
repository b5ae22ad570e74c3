"""Item vectors that start from the order users met the items in (``--item-init transitions``).

Two items that users take one right after the other (the next episode, an accessory, a sequel) are
related in a way a topic is not: the neighbours of a user's last item are often the next one. The
towers learn that from examples too, but slowly for rare items, whose rows see few updates. This
option starts the id table from a spectral embedding of the graph whose edges are consecutive items
in the users' training histories (either direction; the leading eigenvectors of its lazy random walk,
by ``torch.svd_lowrank``), so training begins with such items already close.

Measured with the defaults otherwise (``benchmarks/quality.py``'s ``item init transitions`` row,
BENCHMARKS.md): it pays where the data is sequential and costs where it is not, so it is an option
(and one of ``twotower tune``'s choices), not the default.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from towers.neighbours import consecutive_pairs


def transition_pairs(train: pd.DataFrame, item_rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """(from, to) table rows of every pair of items one user had one right after the other
    (``towers.neighbours.consecutive_pairs``: each user's rows by time, ties in the input's order).
    ``item_rows``: ids -> table rows (0 for an id outside the table; such pairs are dropped)."""
    users = pd.factorize(train["user_id"].astype(str))[0]
    rows = np.asarray(item_rows(train["item_id"].to_numpy()), dtype=np.int64)
    return consecutive_pairs(users, rows, train["timestamp"].to_numpy(dtype=np.int64), missing=0)


def transition_graph(src: np.ndarray, dst: np.ndarray, n_rows: int) -> torch.Tensor:
    """(n_rows, n_rows) coalesced sparse counts of the pairs, both directions (symmetric)."""
    idx = torch.from_numpy(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n_rows, n_rows), check_invariants=True).coalesce()


def spectral_rows(src: np.ndarray, dst: np.ndarray, n_rows: int, width: int) -> torch.Tensor:
    """(n_rows, width) unit rows: the leading eigenvectors of the transition graph's lazy random walk,
    scaled by the square roots of their eigenvalues. Row 0 (padding) and items without a
    transition are zero. Deterministic for a given torch seed (the caller seeds it)."""
    out = torch.zeros(n_rows, width)
    if len(src) == 0:
        return out
    graph = transition_graph(src, dst, n_rows)
    deg_raw = torch.sparse.sum(graph, dim=1).to_dense()
    deg = deg_raw.clamp_min(1.0)
    # the lazy walk (I + D^-1/2 A D^-1/2) / 2 over the connected items: positive semi-definite, so its
    # leading singular vectors are its smoothest eigenvectors. Without the identity, a chain of items
    # (a bipartite graph) has as large alternating modes, which set neighbours APART
    i = graph.indices()
    loops = torch.nonzero(deg_raw > 0).squeeze(1)
    idx = torch.cat([i, loops.unsqueeze(0).expand(2, -1)], dim=1)
    vals = torch.cat([graph.values() / torch.sqrt(deg[i[0]] * deg[i[1]]), torch.ones(len(loops))]) * 0.5
    graph = torch.sparse_coo_tensor(idx, vals, (n_rows, n_rows), check_invariants=True).coalesce()
    q = min(width, n_rows - 1)
    u, s, _ = torch.svd_lowrank(graph, q=q, niter=4)
    out[:, :q] = u * s.sqrt()
    # an item with no transition has an all-zero row in the graph; the randomized SVD still leaves
    # rounding noise there, which normalising would blow up into a unit row
    out[deg_raw == 0] = 0.0
    return torch.nn.functional.normalize(out, dim=1)  # all-zero rows stay zero


@torch.no_grad()
def init_from_transitions(weight: torch.Tensor, train: pd.DataFrame, item_rows: Any) -> int:
    """Overwrite the item table ``weight`` (rows x width) with the transition embedding, each row at
    the table's current mean row norm (the scale its random init chose). Items without a transition
    keep their random rows. Returns the number of transitions used."""
    src, dst = transition_pairs(train, item_rows)
    emb = spectral_rows(src, dst, weight.shape[0], weight.shape[1]).to(weight.device, weight.dtype)
    has = emb.abs().sum(dim=1) > 0
    weight[has] = emb[has] * weight[1:].norm(dim=1).mean()
    weight[0].zero_()
    return len(src)
