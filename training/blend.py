"""The towers' scores blended with the user's last item's neighbours (``towers.neighbours``).

Training picks the blend's weight on the validation split (``choose_weight``, run once after the best
epoch is known): it scores the validation users with the towers, adds ``weight * cosine(last, item)``
(``Neighbours.bonus``) for the neighbours of each user's last item, counted from the training split
alone, and keeps the weight with the highest masked HR@K; ties go to the smaller weight. The chosen
weight travels in the checkpoint's meta (``neighbour_weight``, tagged ``neighbour_score``); the
offline evaluation (``blended_scorer``) and the service apply it the same way. A gain that the
validation users' noise could explain (``MIN_Z``) keeps 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from towers.neighbours import Neighbours, consecutive_pairs
from training.evaluate import MIN_Z, mask_inplace, padded_cols, paired_difference

# geometric from 1/64 to 16 (the bonus is a cosine in (0, 1]; the towers' cosine / temperature logits
# span ~8 per unit of cosine at T = 0.12), and 0: the towers alone. With a grid up to 32 the validation
# rows chose 4 on synthetic-longtail and synthetic-short
WEIGHTS: tuple[float, ...] = (0.0, *(2.0 ** e for e in range(-6, 5)))
# a blend must beat the towers alone by MIN_Z standard errors of the paired difference on the
# validation users: on ml-latest-small (610 users) the best weight gained 0.013 valid HR@50 (1.4 of
# them) and lost 0.015 on test
__all__ = ["WEIGHTS", "blended_scorer", "choose_weight", "last_items", "neighbours_from"]


def neighbours_from(interactions: pd.DataFrame, item_ids: Any) -> Neighbours:
    """The neighbour table of ``interactions`` (user_id, item_id, timestamp) over the catalogue
    ``item_ids`` (evaluation columns); items outside it take no part."""
    cols = pd.Index(item_ids).get_indexer(interactions["item_id"])
    users = pd.factorize(interactions["user_id"].astype(str))[0]
    src, dst = consecutive_pairs(users, cols, interactions["timestamp"].to_numpy())
    return Neighbours.from_pairs(src, dst, len(item_ids))


def last_items(ev: Any, users: np.ndarray) -> np.ndarray:
    """(B,) each user's last history column (the item right before the target), -1 without one."""
    ends = ev.hist_indptr[users + 1]
    has = ends > ev.hist_indptr[users]
    return np.where(has, ev.hist_cols[np.maximum(ends - 1, 0)], -1)


def blended_scorer(score: Any, ev: Any, nb: Neighbours, weight: float) -> Any:
    """``score`` (users -> (B, N) tower scores) plus ``weight`` times the bonus (``Neighbours.bonus``) of
    each user's last item's neighbours."""

    def blended(users: np.ndarray) -> torch.Tensor:
        s = torch.as_tensor(score(users))  # (B, N): a new block from the scorer, added to in place
        q, cols, bonus = nb.bonus(last_items(ev, np.asarray(users)))
        s[torch.from_numpy(q), torch.from_numpy(cols)] += torch.from_numpy(bonus) * weight
        return s

    return blended


def choose_weight(score: Any, ev: Any, nb: Neighbours, k: int, weights: tuple[float, ...] = WEIGHTS,
                  batch: int = 1024, min_z: float = MIN_Z) -> tuple[float, dict[float, float], str]:
    """(the chosen weight, {weight: masked HR@k on ``ev``}, why it was chosen).

    The weight with the best HR@k, unless its gain over the towers alone (weight 0) is within
    ``min_z`` standard errors of the paired difference (users the two rank differently): then 0.

    Exact without scoring the whole catalogue per weight: a target is in a blended top k iff fewer
    than k items outscore it, and an item outside both the masked tower top k and the neighbours has
    no bonus and a tower score at most the k-th one, so it can only outscore a target that k items
    already outscore. So each weight ranks the target among those candidates alone.
    """
    if weights[0] != 0.0:
        raise ValueError("the weights must start with 0 (the towers alone)")
    w = torch.tensor(weights, dtype=torch.float32)  # (W,)
    hit_rows: list[torch.Tensor] = []
    for s0 in range(0, ev.n_users, batch):
        users = np.arange(s0, min(s0 + batch, ev.n_users))
        s = torch.as_tensor(score(users)).float()  # (B, N), masked in place: the scorers return a new block
        mask_inplace(s, ev, users)
        n = s.shape[1]
        kk = min(k, n)
        top_c = s.topk(kk, dim=1).indices  # (B, k)
        q, nc, bonus = nb.bonus(last_items(ev, users))
        tc, tv = padded_cols(ev.target_indptr, ev.target_cols, users)  # one target per user (leave-last-out)
        has_tgt, tgt = tv[:, 0], torch.from_numpy(tc[:, 0])
        b = torch.arange(len(users))
        # candidates (row, col), each once: the tower's top k and the neighbours, with their bonus
        keys = torch.cat([b.repeat_interleave(kk) * n + top_c.reshape(-1), torch.from_numpy(q * n + nc)])
        vals = torch.cat([torch.zeros(len(users) * kk), torch.from_numpy(bonus)])
        keys, inv = torch.unique(keys, return_inverse=True)
        cand_bonus = torch.zeros(len(keys)).index_add_(0, inv, vals)
        cand_row, cand_col = keys // n, keys % n
        cand_s = s[cand_row, cand_col]
        tgt_bonus = torch.zeros(len(users))
        at_tgt = cand_col == tgt[cand_row]
        tgt_bonus[cand_row[at_tgt]] = cand_bonus[at_tgt]
        tgt_s = s[b, tgt]  # (B,) a target is never masked
        tgt_blend = tgt_s[:, None] + tgt_bonus[:, None] * w  # (B, W)
        # (C, W): candidates that outscore their row's target (masked ones never do)
        above = (cand_s[:, None] + cand_bonus[:, None] * w > tgt_blend[cand_row]) & torch.isfinite(cand_s)[:, None]
        ahead = torch.zeros(len(users), len(weights)).index_add_(0, cand_row, above.float())
        hit_rows.append((ahead < kk)[torch.from_numpy(has_tgt)])
    hits = torch.cat(hit_rows).float() if hit_rows else torch.zeros(0, len(weights))  # (U, W)
    n_users = max(1, hits.shape[0])
    hr = {float(x): float(h) / n_users for x, h in zip(weights, hits.sum(0).tolist(), strict=True)}
    best = max(hr, key=lambda x: (hr[x], -x))  # the smaller weight on a tie
    if best == 0.0:
        return 0.0, hr, f"no weight beat the towers alone ({hr[0.0]:.4f} valid HR@{k})"
    # per user: +1 found with the blend only, -1 without only
    ahead_by, se = paired_difference(hits[:, weights.index(best)].numpy(), hits[:, 0].numpy())
    gain = f"{hr[best]:.4f} valid HR@{k} at {best:g} against {hr[0.0]:.4f} for the towers alone"
    if not ahead_by > min_z * se:
        return 0.0, hr, f"{gain}: within {min_z:g} standard errors ({se:.4f}) of no gain, so 0"
    return best, hr, f"{gain} (+{ahead_by / se:.1f} standard errors)"
