"""Offline evaluation: ONE exact, full-catalogue evaluator for every model and baseline.

Everything that ranks items (our towers, EASE, popularity, torch-rechub's embeddings) is turned
into a *scorer*: something that maps a batch of evaluation users to scores over the whole catalogue,
shape (B, N_items). The same code then ranks every catalogue item, so numbers are comparable.

Protocol (per-user temporal leave-last-out, ``training.data.split_leave_last_out``):
- ``which="test"``: target = the user's test row; the history the model may read = train + valid rows.
- ``which="valid"``: target = the valid row; history = train rows.
- "raw" metrics rank the full catalogue as scored; "masked" metrics first set every item in the
  user's history to -inf (the items a recommender would never re-show), but never a target item.

Metrics for each K: HR@K (any target in the top K), Recall@K (targets in top K / number of targets;
equal to HR@K with one target per user), NDCG@K (binary gains, ideal DCG over min(#targets, K)),
and MRR as a FULL-RANK reciprocal rank of the best-placed target (not truncated at any K).

Ties: an item ranks ahead of a target when its score is strictly higher, or equal and it comes
earlier in catalogue order, i.e. the position the target would have in a stable descending sort.
NaN scores count as -inf.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from towers.artifacts import atomic_write_json, resolve_model_dir
from towers.neighbours import Neighbours
from towers.schema import DataError
from training.memory import release_freed_memory

if TYPE_CHECKING:  # torch is imported lazily so `twotower --help` stays fast
    import torch

    from training.data import RecData, Split

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (10, 50, 100)
# users per scoring block: about this many (user, target, item) elements; at a 1M-item catalogue
# that is 8 users: 32 MB of scores, and (B, N) booleans for the ranks
_BLOCK_ELEMS = 1 << 23

MaskMode = Literal["both", "raw", "masked"]
# a scorer: positions into EvalSet.user_ids (int64, (B,)) -> scores (B, N_items), numpy or torch
ScoreFn = Callable[[np.ndarray], Any]


def _csr(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack a list of int arrays as (indptr, indices)."""
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    indptr = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
    return indptr, indices


@dataclass
class EvalSet:
    """Everything the evaluator needs about one split side, in catalogue column order.

    Rows are evaluation users (``user_ids``); columns are ``item_ids`` (the catalogue, in
    ``RecData.items`` order). Ragged per-user lists are CSR pairs (indptr (U+1,), indices).
    """

    which: str
    user_ids: np.ndarray            # (U,) object array of str
    item_ids: np.ndarray            # (N,) catalogue ids, catalogue order
    hist_indptr: np.ndarray         # history before the target, time order (duplicates kept)
    hist_cols: np.ndarray
    target_indptr: np.ndarray       # the held-out item(s) of each user
    target_cols: np.ndarray
    mask_indptr: np.ndarray         # distinct history items minus the user's targets
    mask_cols: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def history_cols(self, users: np.ndarray) -> list[np.ndarray]:
        return [self.hist_cols[self.hist_indptr[u]:self.hist_indptr[u + 1]] for u in users]

    def history_item_ids(self, users: np.ndarray) -> list[list[Any]]:
        """Histories as catalogue item ids (oldest first) for the user tower's input."""
        return [self.item_ids[c].tolist() for c in self.history_cols(users)]

    def history_matrix(self, users: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Binary (B, N) matrix of the items in each user's history (input to EASE and friends)."""
        out = np.zeros((len(users), self.n_items), dtype=dtype)
        for r, cols in enumerate(self.history_cols(users)):
            out[r, cols] = 1
        return out

    def target_item_ids(self, u: int) -> list[Any]:
        return self.item_ids[self.target_cols[self.target_indptr[u]:self.target_indptr[u + 1]]].tolist()


def build_eval_set(data: RecData, split: Split, which: str = "test") -> EvalSet:
    """Collect targets, histories and the mask for ``which`` in {"test", "valid"}."""
    if which not in ("test", "valid"):
        raise ValueError(f"which must be 'test' or 'valid', got {which!r}")
    item_ids = data.items.index.to_numpy()
    col_index = pd.Index(item_ids)
    if not col_index.is_unique:
        raise DataError("the item catalogue has duplicate item ids")
    targets = split.test if which == "test" else split.valid
    if len(targets) == 0:
        raise DataError(f"the {which} split is empty: no user has enough interactions to hold one out")
    history = known_before(split, which)

    tgt_cols = col_index.get_indexer(targets["item_id"])
    if (tgt_cols < 0).any():
        bad = targets["item_id"].to_numpy()[tgt_cols < 0][0]
        raise DataError(f"{which} target item {bad!r} is not in the item catalogue")
    tgt = pd.DataFrame({"user_id": targets["user_id"].astype(str).to_numpy(), "col": tgt_cols})
    user_ids = pd.unique(tgt["user_id"])  # keeps the split's user order
    user_pos = pd.Index(user_ids)

    hist = history[history["user_id"].astype(str).isin(user_pos)]
    hist = hist.assign(user_id=hist["user_id"].astype(str),
                       col=col_index.get_indexer(hist["item_id"]))
    n_unknown = int((hist["col"] < 0).sum())
    if n_unknown:  # an item outside the catalogue cannot be scored or masked; drop it, loudly
        log.warning("%d history rows name items outside the catalogue; ignored", n_unknown)
        hist = hist[hist["col"] >= 0]
    hist = hist.assign(u=user_pos.get_indexer(hist["user_id"]))
    hist = hist.sort_values(["u", "timestamp"], kind="stable")
    tgt = tgt.assign(u=user_pos.get_indexer(tgt["user_id"]))

    U = len(user_ids)
    hist_groups = _group_cols(hist["u"].to_numpy(), hist["col"].to_numpy(), U)
    tgt_groups = _group_cols(tgt["u"].to_numpy(), tgt["col"].to_numpy(), U)
    # the mask never contains a target: a re-consumed item must still count as a hit
    mask_groups = [np.setdiff1d(h, t) for h, t in zip(hist_groups, tgt_groups, strict=True)]
    hist_indptr, hist_cols = _csr(hist_groups)
    tgt_indptr, tgt_cols_arr = _csr([np.unique(t) for t in tgt_groups])
    mask_indptr, mask_cols = _csr(mask_groups)
    return EvalSet(which=which, user_ids=np.asarray(user_ids, dtype=object), item_ids=item_ids,
                   hist_indptr=hist_indptr, hist_cols=hist_cols, target_indptr=tgt_indptr,
                   target_cols=tgt_cols_arr, mask_indptr=mask_indptr, mask_cols=mask_cols)


def known_before(split: Split, which: str) -> pd.DataFrame:
    """The interactions known when ``which``'s targets are predicted: train (+ valid for "test")."""
    return pd.concat([split.train, split.valid]) if which == "test" else split.train


def _group_cols(u: np.ndarray, cols: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Split ``cols`` by user position ``u`` (already sorted by u), keeping the given order."""
    order = np.argsort(u, kind="stable")
    u, cols = u[order], cols[order]
    bounds = np.searchsorted(u, np.arange(n_users + 1))
    return [cols[bounds[i]:bounds[i + 1]] for i in range(n_users)]


# ----------------------------------------------------------------------------------------------
# scorers


def embedding_scorer(user_vecs: Any, item_vecs: Any) -> ScoreFn:
    """Dot-product scorer from precomputed (U, D) user vectors (EvalSet user order) and (N, D) items;
    (U, K, D) multi-interest users score an item by their best interest."""
    import torch

    from training.losses import interest_scores

    u = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32) if not isinstance(user_vecs, torch.Tensor)
                        else user_vecs.float())
    v = torch.as_tensor(np.asarray(item_vecs, dtype=np.float32) if not isinstance(item_vecs, torch.Tensor)
                        else item_vecs.float())
    if u.ndim not in (2, 3) or v.ndim != 2 or u.shape[-1] != v.shape[1]:
        raise ValueError(f"user vectors {tuple(u.shape)} and item vectors {tuple(v.shape)} do not match")

    def score(users: np.ndarray) -> torch.Tensor:
        return interest_scores(u[torch.as_tensor(users)], v)  # (B, N)

    return score


def _as_score_fn(scores: Any) -> ScoreFn:
    """Accept a callable, a full (U, N) matrix, or a (user_vecs, item_vecs) pair."""
    if callable(scores):
        return scores
    if isinstance(scores, tuple) and len(scores) == 2:
        return embedding_scorer(*scores)
    mat = scores

    def score(users: np.ndarray) -> Any:
        return mat[users]

    return score


def model_scorer(model: Any, data: RecData, ev: EvalSet, batch_size: int = 1024,
                 item_vecs: np.ndarray | None = None) -> ScoreFn:
    """Scorer for a towers ``TwoTowerModel``: user tower on the history before the target.

    The item tower embeds ``data.items`` (catalogue order = evaluator columns) unless the caller
    has those vectors already (``item_vecs``, (N, D)); the user tower reads each user's features
    and history (oldest first, the encoder keeps the recent window).
    """
    import torch

    from training.losses import interest_scores

    vecs = model.embed_items(data.items) if item_vecs is None else item_vecs
    items_t = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))  # (N, D)
    if items_t.shape[0] != ev.n_items:
        raise ValueError(f"embed_items returned {items_t.shape[0]} rows for {ev.n_items} catalogue items")

    def score(users: np.ndarray) -> torch.Tensor:
        out = []
        for s in range(0, len(users), batch_size):
            part = users[s:s + batch_size]
            uids = ev.user_ids[part].tolist()
            uvec = model.embed_users(uids, _user_feature_rows(data.users, uids), ev.history_item_ids(part))  # (b, D), or (b, K, D)
            out.append(interest_scores(torch.from_numpy(np.asarray(uvec, dtype=np.float32)), items_t))  # (b, N)
        # one batch (the evaluator's own calls): no copy; a fresh (B, N) block costs its page faults
        return out[0] if len(out) == 1 else torch.cat(out)

    return score


def _user_feature_rows(users: pd.DataFrame, uids: list[str]) -> Any:
    """Feature rows aligned with ``uids`` (the encoder wants one row per user, in order);
    a user missing from the table gets None (all features missing)."""
    pos = users.index.astype(str).get_indexer(uids) if len(users.index) else np.full(len(uids), -1)
    if (pos >= 0).all():
        return users.iloc[pos]
    return [None if p < 0 else users.iloc[int(p)].to_dict() for p in pos]


# ----------------------------------------------------------------------------------------------
# the evaluator


def _to_tensor(x: Any) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if not arr.flags.writeable:  # e.g. a broadcast view; torch needs memory it may write
            arr = arr.copy()
        t = torch.from_numpy(arr)
    t = t.detach().to("cpu")
    if not torch.is_floating_point(t):
        t = t.float()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    # NaN must never rank above anything; +inf stays +inf. Always a new tensor: the evaluator masks
    # it in place, never the scorer's own array
    return torch.nan_to_num(t, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def padded_cols(indptr: np.ndarray, cols: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) padded column matrix and validity mask for a batch of users."""
    lens = indptr[users + 1] - indptr[users]
    T = max(int(lens.max()) if len(lens) else 0, 1)
    out = np.zeros((len(users), T), dtype=np.int64)
    valid = np.arange(T)[None, :] < lens[:, None]
    for r, u in enumerate(users):
        out[r, :lens[r]] = cols[indptr[u]:indptr[u + 1]]
    return out, valid


def target_ranks(scores: torch.Tensor, tgt_cols: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target column among all N columns: (B, N), (B, T) -> (B, T).

    rank = #items scoring strictly higher + #items scoring equal that come earlier in the catalogue.
    One target column at a time: the temporaries are (B, N) booleans, never (B, T, N).
    """
    import torch

    N = scores.shape[1]
    t = scores.gather(1, tgt_cols)  # (B, T)
    out = torch.empty_like(tgt_cols)
    for j in range(tgt_cols.shape[1]):
        tj = t[:, j:j + 1]  # (B, 1)
        out[:, j] = _count(scores > tj)
        eq = scores == tj  # (B, N), the target itself included
        if bool((_count(eq) > 1).any()):  # ties (rare with real scores): the earlier ones rank ahead
            out[:, j] += _count(eq & (torch.arange(N).view(1, N) < tgt_cols[:, j:j + 1]))
    return out


def _count(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B,) int64 count of True per row. Summed as bytes into int32: torch's own
    ``bool.sum`` widens every element to int64 first, ~11x slower at 8 x 1M (75 vs 6.5 ms)."""
    import torch

    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _per_user_metrics(ranks: torch.Tensor, valid: torch.Tensor, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Every metric per user (B,) from (B, T) target ranks and their validity mask."""
    import torch

    n_t = valid.sum(1).clamp(min=1).double()  # (B,)
    r = ranks.double()
    out: dict[str, np.ndarray] = {}
    gains = torch.where(valid, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))  # (B, T)
    for k in ks:
        hit = valid & (ranks < k)  # (B, T)
        out[f"HR@{k}"] = hit.any(1).double().numpy()
        out[f"Recall@{k}"] = (hit.sum(1).double() / n_t).numpy()
        dcg = torch.where(hit, gains, torch.zeros_like(gains)).sum(1)
        ideal_n = torch.minimum(n_t, torch.tensor(float(k), dtype=torch.float64))
        discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)  # (k,)
        idcg = torch.cumsum(discounts, 0)[(ideal_n - 1).long()]
        out[f"NDCG@{k}"] = (dcg / idcg).numpy()
    best = torch.where(valid, r, torch.full_like(r, math.inf)).min(1).values
    out["MRR"] = (1.0 / (best + 1.0)).numpy()
    return out


def evaluate_scores(scores: Any, ev: EvalSet, ks: Sequence[int] = DEFAULT_KS, mask_seen: MaskMode = "both",
                    chunk_users: int | None = None, per_user: bool = False) -> dict[str, Any]:
    """Exact full-catalogue metrics for any scorer.

    ``scores``: a function ``users (B,) int64 positions into ev.user_ids -> (B, N) scores``
    (numpy or torch), a precomputed (U, N) matrix, or a ``(user_vecs (U, D), item_vecs (N, D))`` pair.
    Returns ``{"raw": {metric: value}, "masked": {...}, "n_users", "n_items", "which", ...}``
    (only the requested sides); ``per_user`` adds ``"per_user": {side: {metric: (U,) array}}``, in
    ``ev.user_ids`` order, for breaking a metric down by groups of users.
    """
    import torch

    if mask_seen not in ("both", "raw", "masked"):
        raise ValueError(f"mask_seen must be 'both', 'raw' or 'masked', got {mask_seen!r}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"every K must be >= 1, got {ks}")
    modes = ("raw", "masked") if mask_seen == "both" else (mask_seen,)
    fn = _as_score_fn(scores)
    U, N = ev.n_users, ev.n_items
    max_t = int(np.diff(ev.target_indptr).max()) if U else 1
    chunk = chunk_users or max(1, min(U, _BLOCK_ELEMS // max(1, N * max_t)))
    # per-user values, averaged once at the end: the result cannot depend on the chunking
    collected: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in modes}
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, U, chunk):
            release_freed_memory(collect=False)  # the last block's pages (else the resident set creeps up)
            users = np.arange(start, min(U, start + chunk), dtype=np.int64)
            S = _to_tensor(fn(users))
            if S.shape != (len(users), N):
                raise ValueError(f"scorer returned shape {tuple(S.shape)}, expected ({len(users)}, {N})")
            tc, tv = padded_cols(ev.target_indptr, ev.target_cols, users)
            tgt = torch.from_numpy(tc)
            valid = torch.from_numpy(tv)
            for mode in modes:
                if mode == "masked":  # after "raw": S is _to_tensor's own new tensor, free to overwrite
                    mask_inplace(S, ev, users)
                for name, v in _per_user_metrics(target_ranks(S, tgt), valid, ks).items():
                    collected[mode].setdefault(name, []).append(v)
    result: dict[str, Any] = {"which": ev.which, "n_users": U, "n_items": N, "ks": list(ks),
                              "mrr": "full-rank", "seconds": round(time.perf_counter() - t0, 3)}
    for mode in modes:
        result[mode] = {name: float(np.concatenate(parts).mean()) if U else float("nan")
                        for name, parts in collected[mode].items()}
    if per_user:
        result["per_user"] = {mode: {name: np.concatenate(parts) if U else np.empty(0)
                                     for name, parts in collected[mode].items()} for mode in modes}
    return result


def mask_inplace(S: torch.Tensor, ev: EvalSet, users: np.ndarray) -> None:
    """Set each user's seen (non-target) items to -inf in the (B, N) score block."""
    import torch

    mc, mv = padded_cols(ev.mask_indptr, ev.mask_cols, users)
    rows = np.broadcast_to(np.arange(len(users))[:, None], mc.shape)[mv]
    S[torch.from_numpy(rows), torch.from_numpy(mc[mv])] = -math.inf


def evaluate_model(model: Any, data: RecData, split: Split, which: str = "test", ks: Sequence[int] = DEFAULT_KS,
                   mask_seen: MaskMode = "both", ev: EvalSet | None = None,
                   item_vecs: np.ndarray | None = None, neighbours: Neighbours | None = None,
                   per_user: bool = False) -> dict[str, Any]:
    """Evaluate a towers ``TwoTowerModel`` (anything with ``embed_users``/``embed_items``), blended
    with its last item's neighbours when its meta carries a weight (training/blend.py);
    ``item_vecs``: the catalogue's vectors in ``data.items`` order, when the caller has them;
    ``neighbours``: the blend's table of what was known before the targets, when the caller has it;
    ``per_user``: as ``evaluate_scores``'s."""
    from towers.neighbours import weight_of
    from training.blend import blended_scorer, neighbours_from

    ev = ev or build_eval_set(data, split, which)
    score = model_scorer(model, data, ev, item_vecs=item_vecs)
    weight = weight_of(getattr(model, "meta", {}))
    if weight > 0:  # the blend the model was published with: the neighbours of what was known then
        nb = neighbours if neighbours is not None else neighbours_from(known_before(split, ev.which), ev.item_ids)
        score = blended_scorer(score, ev, nb, weight)
    return evaluate_scores(score, ev, ks=ks, mask_seen=mask_seen, per_user=per_user)


# how many standard errors of the per-user difference a gain must clear before a choice made on the
# validation rows counts it (the neighbour blend's weight, twotower tune's winner over the defaults)
MIN_Z = 2.0


def paired_difference(new: Any, base: Any) -> tuple[float, float]:
    """(mean, standard error) of the per-user difference ``new - base`` of two models' hits on the
    same users: how far one is ahead of the other, and how much of that the users' noise explains."""
    diff = np.asarray(new, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, math.inf
    return float(diff.mean()), float(diff.std(ddof=1)) / math.sqrt(len(diff))


# ----------------------------------------------------------------------------------------------
# folding diagnostic


def folding_share(model_or_scores: Any, data: RecData, split: Split, k: int = 50, which: str = "test",
                  ev: EvalSet | None = None, mask_seen: bool = True) -> float:
    """Mean share of each user's top-K items whose cluster the user never touched in training.

    Needs ground-truth clusters (``data.truth["item_cluster"]``, synthetic data). A two-tower model
    trained on positives only can "fold" unrelated clusters onto each other, and then recommends
    items from clusters the user has no interest in; negatives should push this share down.
    Items without a known cluster are left out of the share's denominator.
    """
    import torch

    if not data.truth or "item_cluster" not in data.truth:
        raise ValueError("folding_share needs data.truth['item_cluster'] (synthetic data with known clusters)")
    ev = ev or build_eval_set(data, split, which)
    if hasattr(model_or_scores, "embed_users") and hasattr(model_or_scores, "embed_items"):
        fn = model_scorer(model_or_scores, data, ev)
    else:
        fn = _as_score_fn(model_or_scores)
    cmap = data.truth["item_cluster"]
    item_cluster = np.array([int(cmap.get(i, -1)) for i in ev.item_ids.tolist()], dtype=np.int64)  # (N,)
    n_clusters = int(item_cluster.max()) + 1 if len(item_cluster) else 0
    col_index = pd.Index(ev.item_ids)
    # clusters each eval user touched in the TRAIN split
    tr = split.train[split.train["user_id"].astype(str).isin(pd.Index(ev.user_ids))]
    u = pd.Index(ev.user_ids).get_indexer(tr["user_id"].astype(str))
    c = col_index.get_indexer(tr["item_id"])
    keep = (c >= 0) & (item_cluster[np.maximum(c, 0)] >= 0)
    touched = np.zeros((ev.n_users, max(n_clusters, 1)), dtype=bool)
    touched[u[keep], item_cluster[c[keep]]] = True

    k = min(k, ev.n_items)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ev.n_users, 1024):
            users = np.arange(start, min(ev.n_users, start + 1024), dtype=np.int64)
            S = _to_tensor(fn(users)).clone()  # the scorer may own this memory
            if mask_seen:
                mask_inplace(S, ev, users)
            top = torch.topk(S, k, dim=1).indices.numpy()  # (B, K)
            clusters = item_cluster[top]  # (B, K)
            known = clusters >= 0
            foreign = known & ~touched[users[:, None], np.maximum(clusters, 0)]
            n_known = known.sum(1)
            ok = n_known > 0
            total += float((foreign.sum(1)[ok] / n_known[ok]).sum())
            count += int(ok.sum())
    return total / count if count else float("nan")


# ----------------------------------------------------------------------------------------------
# report helpers and the `twotower eval` subcommand


def format_table(rows: dict[str, dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """Plain-text table, one column per model and one line per metric (masked first, then raw)."""
    metrics = [f"{m}@{k}" for m in ("HR", "Recall", "NDCG") for k in ks] + ["MRR"]
    names = list(rows)
    lines = [["metric", *names]]
    for side in ("masked", "raw"):
        if not any(side in res for res in rows.values()):
            continue
        for metric in metrics:
            lines.append([f"{metric} {side}"] + [f"{res[side][metric]:.4f}" if side in res else "-"
                                                 for res in rows.values()])
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in lines)


def register_eval(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (wired from ``training/cli.py``)."""
    p = subparsers.add_parser(
        "eval", help="exact full-catalogue evaluation of a trained model (HR/Recall/NDCG/MRR) vs popularity",
        description="Score every catalogue item for each held-out user with the saved model, report "
                    "HR@K, Recall@K, NDCG@K and full-rank MRR with and without masking seen items, "
                    "next to a popularity baseline, and write eval.json into the model version directory.")
    p.add_argument("--artifacts", required=True, help="artifacts directory (holds models/<version>/)")
    p.add_argument("--model-version", default=None, help="model version (default: the one named in models/LATEST)")
    p.add_argument("--data", default=None,
                   help="data spec (synthetic | movielens:DIR | csv:DIR); default: the model version's own "
                        "data/ snapshot (what it was trained on), else the spec in its config.json")
    p.add_argument("--split", choices=("test", "valid"), default="test", help="which held-out row to score")
    p.add_argument("--ks", default="10,50,100", help="comma-separated cut-offs (default 10,50,100)")
    p.set_defaults(handler=_eval_command)
    return p


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError as exc:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from exc
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {text!r}")
    return ks


def _data_for(mdir: Path, given: str | None) -> tuple[str, dict[str, Any]]:
    """(spec, load_data options). Default: the model's own data snapshot (exactly what it was
    trained on), else the spec and options recorded in its config.json."""
    if given:
        return given, {}
    snap = mdir / "data"
    if (snap / "interactions.parquet").is_file() or (snap / "interactions.csv").is_file():
        return f"csv:{snap}", {}
    cfg_path = mdir / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=cfg_path, line=exc.lineno) from exc
        spec = _find_key(cfg, "data")
        if isinstance(spec, str) and spec:
            opts = _find_key(cfg, "data_options")
            return spec, dict(opts) if isinstance(opts, dict) else {}
    raise DataError("no --data given, and the model has neither a data/ snapshot nor a data spec in "
                    "config.json", path=mdir)


def _find_key(obj: Any, key: str) -> Any:
    """First value under ``key`` at the top level or one level down (config.json nests per section)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            if isinstance(v, dict) and key in v:
                return v[key]
    return None


def _eval_command(args: argparse.Namespace) -> int:
    from towers.checkpoint import load_checkpoint
    from training.baselines import popularity_scorer
    from training.data import load_data, split_leave_last_out

    ks = _parse_ks(args.ks)
    mdir, _ = resolve_model_dir(args.artifacts, args.model_version)
    spec, opts = _data_for(mdir, args.data)
    data = load_data(spec, **opts)
    split = split_leave_last_out(data)
    ev = build_eval_set(data, split, args.split)
    model = load_checkpoint(mdir / "model.pt")
    results = {
        "model": evaluate_model(model, data, split, which=args.split, ks=ks, ev=ev),
        "popularity": evaluate_scores(popularity_scorer(split.train, ev), ev, ks=ks),
    }
    print(f"model {mdir.name} on {spec} ({args.split}: {ev.n_users} users, {ev.n_items} items; "
          f"masked = items seen before the target removed; MRR is full-rank)")
    print(format_table(results, ks))
    payload = {"model_version": mdir.name, "data": spec, "split": args.split,
               "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results}
    out = mdir / "eval.json"
    atomic_write_json(out, payload)  # never leave a half-written eval.json behind
    print(f"wrote {out}")
    return 0
