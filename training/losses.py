"""Retrieval losses with ONE signature (the shape of TFRS's Retrieval task).

    retrieval_loss(user_vecs (B, D), item_vecs (C, D), item_rows (C,), sampling_logq (C,) | None,
                   *, temperature, loss, logq_correction, mask_accidental_hits, ...) -> scalar

Candidates are ``[positives; extra negatives]``: row i's positive is candidate i (C >= B), and the
other candidates are its negatives (the other rows' positives only when ``in_batch_negatives``).
Vectors are unit-norm (the towers normalise), so ``u . v / temperature`` is a scaled cosine.

- ``softmax`` (default): sampled softmax, cross-entropy of the positive among its candidates.
- ``bpr``: -log sigmoid(s_pos - s_neg), averaged over the row's negatives.
- ``bce``: independent binary cross-entropy, positive -> 1, each negative -> 0 (negatives averaged).
- ``positive``: no negatives at all: 1 - cos(user, positive). Nothing pushes unrelated items apart,
  so embeddings can "fold" (the folding diagnostic compares against it).

logQ correction subtracts ``sampling_logq`` (log expected count of the candidate under the sampler)
from every logit, the positive's included, as sampled softmax prescribes. Accidental hits are
candidates equal to the row's own positive (a popular item drawn again as a "negative", or the
same item being another row's positive) and, optionally, items of the user's training history;
they are removed from the row's negatives.

Multi-interest users (``user_vecs`` (B, K, D), K interests per user): a candidate's logit is
``logsumexp_k(u_k . v / temperature)``, a soft maximum over the user's interests, so the interest
nearest the item answers for it and the others keep learning (a hard maximum trains only the
winner). Serving ranks by the maximum, which the soft one bounds within ``log K``: trained either
way and ranked by the maximum (3 interests), the soft one had the better test HR@50 on all four
quality datasets in the runs that chose it (not in BENCHMARKS.md): ml-100k 0.533 vs 0.519,
ml-latest-small 0.344 vs 0.331, synthetic-longtail 0.391 vs 0.387, synthetic-short 0.490 vs 0.489.
``interest_scores`` is the ranking score.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from training.config import LOSS_NAMES

# what a user picks, plus "positive": the loss of a run with no negatives at all
LOSSES = (*LOSS_NAMES, "positive")


def interest_scores(user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    """(B, C) ranking scores: ``u @ v.T`` for (B, D) users, the maximum over interests for (B, K, D)."""
    if user_vecs.dim() == 2:
        return user_vecs @ item_vecs.T
    B, K, D = user_vecs.shape
    out = torch.empty((B, item_vecs.shape[0]), dtype=user_vecs.dtype, device=user_vecs.device)
    # 128 users at a time: their (128 K, C) block stays in cache for the maximum (a microbenchmark
    # while writing this, 1024 users x 3 interests x 5,000 items: 40 ms in one piece, 29 ms in blocks)
    for s in range(0, B, 128):
        u = user_vecs[s:s + 128]
        torch.amax(torch.mm(u.reshape(-1, D), item_vecs.T).view(len(u), K, -1), dim=1, out=out[s:s + 128])
    return out


def _logits(user_vecs: torch.Tensor, item_vecs: torch.Tensor, temperature: float,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) training logits: ``u . v / t`` (+ bias (C,)), or the soft maximum over interests."""
    if user_vecs.dim() == 2:
        if bias is None:
            return (user_vecs @ item_vecs.T) / temperature
        # -logq (1, C) + (u @ v.T) / temperature in one fused op
        return torch.addmm(bias.unsqueeze(0), user_vecs, item_vecs.T, alpha=1.0 / temperature)
    z = torch.logsumexp(torch.matmul(user_vecs, item_vecs.T).mul_(1.0 / temperature), dim=1)  # (B, C)
    return z if bias is None else z + bias.unsqueeze(0)


def retrieval_logits(user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_rows: torch.Tensor,
                     sampling_logq: torch.Tensor | None = None, *, temperature: float = 0.05,
                     logq_correction: bool = True, mask_accidental_hits: bool = True,
                     in_batch_negatives: bool = True, history_mask: torch.Tensor | None = None,
                     hard_negatives: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The full picture, for inspection and tests: corrected logits (B, C) over every candidate and
    the negative mask (B, C), True where candidate j counts as a negative for row i (the positive of
    row i is column i and never a negative). ``retrieval_loss`` computes the same thing faster."""
    B, C = _check(user_vecs, item_vecs, item_rows, temperature)
    logits = _logits(user_vecs, item_vecs, temperature)  # (B, C)
    if logq_correction and sampling_logq is not None:
        logits = logits - sampling_logq.to(logits.dtype).unsqueeze(0)  # (B, C) - (1, C)
    pos_logit, neg_logits, excluded, offset = _parts(
        user_vecs, item_vecs, item_rows, sampling_logq, temperature=temperature, logq_correction=logq_correction,
        mask_accidental_hits=mask_accidental_hits, in_batch_negatives=in_batch_negatives,
        history_mask=history_mask, hard_negatives=hard_negatives)
    neg = torch.zeros((B, C), dtype=torch.bool, device=logits.device)
    neg[:, offset:] = ~excluded
    return logits, neg


def _check(user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_rows: torch.Tensor,
           temperature: float) -> tuple[int, int]:
    B, C = user_vecs.shape[0], item_vecs.shape[0]
    if user_vecs.dim() not in (2, 3) or user_vecs.shape[-1] != item_vecs.shape[-1]:
        raise ValueError(f"user vectors {tuple(user_vecs.shape)} (B, D) or (B, K, D) do not match "
                         f"item vectors {tuple(item_vecs.shape)}")
    if C < B:
        raise ValueError(f"need at least one candidate per row: {C} candidates for {B} users")
    if item_rows.shape != (C,):
        raise ValueError(f"item_rows has shape {tuple(item_rows.shape)}, expected ({C},)")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return B, C


def _parts(user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_rows: torch.Tensor,
           sampling_logq: torch.Tensor | None, *, temperature: float, logq_correction: bool,
           mask_accidental_hits: bool, in_batch_negatives: bool, history_mask: torch.Tensor | None,
           hard_negatives: int, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """Positive logits (B,), negative logits (B, K) over candidates ``offset:`` and their EXCLUDED
    mask (True = not a negative of this row). With ``fused`` the negative logits are not computed
    (None): the fused softmax computes them itself, and the excluded cells come as flat indices into
    the (B, K) block where no mask needs them dense (no history mask, no hard negatives).

    Without in-batch negatives only the extra candidates (offset B) are scored: no wasted (B, B)
    block. Every elementwise pass over the (B, K) block costs as much as the matmul on a CPU, so the
    correction rides inside ``addmm`` and the positive is scored apart (a row-wise dot product).
    """
    B, C = _check(user_vecs, item_vecs, item_rows, temperature)
    offset = 0 if in_batch_negatives else B
    cand_vecs, cand_rows = item_vecs[offset:], item_rows[offset:]  # (K, D), (K,)
    pos_rows = item_rows[:B]
    if user_vecs.dim() == 2:
        pos_logit = (user_vecs * item_vecs[:B]).sum(-1) / temperature  # (B,)
    else:  # (B, K, D) . (B, 1, D) -> (B, K) -> soft maximum over the interests
        pos_logit = torch.logsumexp((user_vecs * item_vecs[:B].unsqueeze(1)).sum(-1) / temperature, dim=1)
    correct = logq_correction and sampling_logq is not None
    if correct:
        assert sampling_logq is not None
        pos_logit = pos_logit - sampling_logq.to(user_vecs.dtype)[:B]
    neg_logits = None if fused else _neg_logits(user_vecs, cand_vecs, sampling_logq if correct else None,
                                                offset, temperature)
    K = cand_rows.shape[0]
    excluded = _excluded_cells(pos_rows, cand_rows, mask_accidental_hits, in_batch_negatives)
    if history_mask is not None:
        if history_mask.shape != (B, C):
            raise ValueError(f"history_mask has shape {tuple(history_mask.shape)}, expected ({B}, {C})")
        excluded = _dense_cells(excluded, B, K) | history_mask[:, offset:]
    if not (fused and excluded.dtype == torch.long and not 0 < hard_negatives < K):
        excluded = _dense_cells(excluded, B, K)
    if 0 < hard_negatives < K:
        # the hardest negatives: the highest raw scores (logQ does not make an item harder)
        with torch.no_grad():
            raw = interest_scores(user_vecs, cand_vecs)  # (B, K)
            top = raw.masked_fill_(excluded, float("-inf")).topk(hard_negatives, dim=1).indices  # (B, h)
            keep = torch.zeros_like(excluded)
            keep.scatter_(1, top, True)
            excluded = excluded | ~keep
    return pos_logit, neg_logits, excluded, offset


def _excluded_cells(pos_rows: torch.Tensor, cand_rows: torch.Tensor, mask_accidental_hits: bool,
                    in_batch_negatives: bool) -> torch.Tensor:
    """The (row, candidate) cells that are not negatives, as sorted flat indices into the (B, K) block:
    the row's own positive wherever it appears among the candidates (with ``mask_accidental_hits``;
    otherwise only its own slot), and every padding candidate (row 0).

    A sort-merge join of the B positives against the K candidate rows: a handful of cells per row,
    where the dense (B, K) comparison and ``masked_fill_`` with a boolean mask each cost more than
    an exponential of the whole block on a CPU (a microbenchmark while writing this, 1024 x 1280:
    1.7 and 2-3 ms, against 0.03 ms to fill the listed cells; the A/B in benchmarks/interests.py).
    """
    B, K = pos_rows.shape[0], cand_rows.shape[0]
    dev = pos_rows.device
    if mask_accidental_hits:
        rows_sorted, order = torch.sort(cand_rows)
        lo = torch.searchsorted(rows_sorted, pos_rows)
        n = torch.searchsorted(rows_sorted, pos_rows, right=True) - lo  # (B,) copies of each positive
        owner = torch.repeat_interleave(torch.arange(B, device=dev), n)
        # the j-th match of row i sits at sorted position lo_i + j
        at = torch.arange(owner.shape[0], device=dev) + torch.repeat_interleave(lo - (torch.cumsum(n, 0) - n), n)
        cells = owner * K + order[at]
    elif in_batch_negatives:
        cells = torch.arange(B, device=dev) * (K + 1)  # the diagonal: the positive itself
    else:
        cells = torch.empty(0, dtype=torch.long, device=dev)
    pad = torch.nonzero(cand_rows == 0).squeeze(1)
    if pad.numel():
        cells = torch.cat([cells, (torch.arange(B, device=dev).unsqueeze(1) * K + pad.unsqueeze(0)).reshape(-1)])
    return cells.sort().values  # ascending: a range of rows is a slice (``_exclude_``)


def _dense_cells(cells: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """Flat cell indices (or an already dense mask) -> the (B, K) boolean mask."""
    if cells.dtype == torch.bool:
        return cells
    return torch.zeros(B * K, dtype=torch.bool, device=cells.device).index_fill_(0, cells, True).view(B, K)


def _exclude_(z: torch.Tensor, excluded: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """-inf into the excluded cells of ``z``, rows ``first_row:`` of the (B, K) block: ``excluded``
    is the whole block's boolean mask or its sorted flat cell indices (``_excluded_cells``)."""
    r, K = z.shape
    if excluded.dtype == torch.bool:
        return z.masked_fill_(excluded[first_row:first_row + r], float("-inf"))
    lo, hi = torch.searchsorted(excluded, torch.tensor([first_row * K, (first_row + r) * K],
                                                       device=excluded.device)).tolist()
    return z.view(-1).index_fill_(0, excluded[lo:hi] - first_row * K, float("-inf")).view(z.shape)


def _neg_logits(user_vecs: torch.Tensor, cand_vecs: torch.Tensor, sampling_logq: torch.Tensor | None,
                offset: int, temperature: float) -> torch.Tensor:
    bias = None if sampling_logq is None else -sampling_logq.to(user_vecs.dtype)[offset:]
    return _logits(user_vecs, cand_vecs, temperature, bias)  # (B, K)


class _Blocks:
    """Reused (B, C) blocks for the fused losses on the CPU.

    A fresh block of a few MB is handed out by the C allocator as new pages, and the first write to
    each page is a page fault: at 1024 x 1280 floats, 1,280 faults and ~3 ms, against 0.3 ms for the
    same product into memory already touched, twice per step (a microbenchmark while writing this;
    the A/B in benchmarks/interests.py). A forward ``take``s its blocks and its backward ``give``s them back
    after their last read, so one step's blocks serve the next step's forward. A forward whose
    backward never runs (no gradient wanted) returns them itself; one whose backward does not come
    before the next forward (accumulating several losses) just means fresh blocks for that one.
    Reusing a block bumps its version counter, so a second backward through a graph whose block was
    reused fails loudly in autograd instead of reading someone else's numbers. CUDA has its own
    caching allocator and is left to it.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._free: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (shape, like.dtype, like.device)
        stack = self._free.get(key)
        if stack:
            return stack.pop()
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def give(self, *blocks: torch.Tensor) -> None:
        for t in blocks:
            if t.device.type != "cpu":
                continue
            key = (tuple(t.shape), t.dtype, t.device)
            stack = self._free.setdefault(key, [])
            if not stack:
                stack.append(t)
            if len(self._free) > self.keep:  # shapes seen long ago (a last short batch): drop
                self._free.pop(next(iter(self._free)))


_BLOCKS = _Blocks()


class _SoftmaxPartition(torch.autograd.Function):
    """log(exp(pos_i) + sum_j exp(logit_ij) over non-excluded j), logit = u_i . c_j / t - logq_j.

    Autograd would keep and re-read half a dozen (B, K) temporaries; this keeps one (the
    exponentials) and its backward is a single elementwise pass plus two matmuls.
    """

    @staticmethod
    def forward(ctx: Any, pos: torch.Tensor, user_vecs: torch.Tensor, cand_vecs: torch.Tensor,
                bias: torch.Tensor | None, excluded: torch.Tensor, temperature: float) -> torch.Tensor:
        z = _BLOCKS.take((user_vecs.shape[0], cand_vecs.shape[0]), user_vecs)
        if bias is None:
            torch.mm(user_vecs, cand_vecs.T, out=z).mul_(1.0 / temperature)  # (B, K)
        else:
            torch.addmm(bias.unsqueeze(0), user_vecs, cand_vecs.T, alpha=1.0 / temperature, out=z)
        _exclude_(z, excluded)
        m = torch.maximum(z.amax(dim=1), pos)  # (B,) finite: pos is finite
        z.sub_(m.unsqueeze(1)).exp_()  # z = exp(logit - m), 0 where excluded
        total = z.sum(dim=1) + torch.exp(pos - m)  # (B,)
        lse = m + torch.log(total)
        if not any(ctx.needs_input_grad):
            _BLOCKS.give(z)
        ctx.save_for_backward(user_vecs, cand_vecs, z, m, lse, pos)
        ctx.temperature = temperature
        ctx.has_bias = bias is not None
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        user_vecs, cand_vecs, z, m, lse, pos = ctx.saved_tensors
        t = ctx.temperature
        # d lse / d logit_ij = softmax_ij = z_ij * exp(m_i - lse_i); scale rows by the upstream grad
        row_scale = grad * torch.exp(m - lse)  # (B,)
        g = z.mul_(row_scale.unsqueeze(1))  # (B, K), in place: z is not read again
        grad_pos = grad * torch.exp(pos - lse)
        grad_u = torch.mm(g, cand_vecs).mul_(1.0 / t) if ctx.needs_input_grad[1] else None
        grad_c = torch.mm(g.T, user_vecs).mul_(1.0 / t) if ctx.needs_input_grad[2] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        _BLOCKS.give(z)
        return grad_pos, grad_u, grad_c, grad_bias, None, None


# exp(1 / t) of a unit-vector logit stays far inside float32 (exp(40) ~ 2e17; K of them summed)
_DIRECT_EXP_MIN_T = 0.025


class _InterestPartition(torch.autograd.Function):
    """``_SoftmaxPartition`` for (B, K, D) multi-interest users: logit_ij = logsumexp_k(u_ik . c_j / t)
    - logq_j. Autograd keeps several (B, K, C) temporaries (matmul, scaled, exp, normalised) and runs
    as many elementwise passes; this keeps one (each interest's share of the soft maximum) and one
    (B, C) block, both reused from step to step (``_Blocks``). Forward + backward at 512 users x 3
    interests x 768 candidates: 7.5 ms against 13.9 ms for the same loss in autograd
    (``benchmarks/interests.py --loss-only``, BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx: Any, pos: torch.Tensor, user_vecs: torch.Tensor, cand_vecs: torch.Tensor,
                bias: torch.Tensor | None, excluded: torch.Tensor, temperature: float) -> torch.Tensor:
        B, K, D = user_vecs.shape
        C = cand_vecs.shape[0]
        w, z = _BLOCKS.take((B, K, C), user_vecs), _BLOCKS.take((B, C), user_vecs)
        m, lse = pos.new_empty(B), pos.new_empty(B)
        u2, inv = user_vecs.reshape(B * K, D), 1.0 / temperature
        for i, j in _row_chunks(B, K * C):
            wc, zc = w[i:j], z[i:j]  # (r, K, C), (r, C)

            def scaled(wc: torch.Tensor = wc, i: int = i, j: int = j) -> torch.Tensor:  # u_k . c / t
                torch.mm(u2[i * K:j * K], cand_vecs.T, out=wc.view(-1, C)).mul_(inv)
                return wc

            scaled()
            top = None
            # unit vectors: |z| <= 1 / t, so exp(z) cannot overflow and the max-shift (two more
            # passes over the block) is not needed; vectors far from unit length that overflow
            # after all take the shifted path
            if temperature < _DIRECT_EXP_MIN_T or not bool(torch.isfinite(torch.sum(wc.exp_(), 1, out=zc)).all()):
                if temperature >= _DIRECT_EXP_MIN_T:
                    scaled()
                top = wc.amax(dim=1)  # (r, C)
                torch.sum(wc.sub_(top.unsqueeze(1)).exp_(), dim=1, out=zc)  # exp(z_k - max_k z), summed
            wc.div_(zc.unsqueeze(1))  # each interest's share: d logit / d z_k
            zc.log_()  # the soft maximum
            if top is not None:
                zc.add_(top)
            if bias is not None:
                zc.add_(bias.unsqueeze(0))
            _exclude_(zc, excluded, i)
            mc = torch.maximum(zc.amax(dim=1), pos[i:j])  # (r,)
            zc.sub_(mc.unsqueeze(1)).exp_()  # exp(logit - m), 0 where excluded
            m[i:j] = mc
            lse[i:j] = mc + torch.log(zc.sum(dim=1) + torch.exp(pos[i:j] - mc))
        if not any(ctx.needs_input_grad):
            _BLOCKS.give(w, z)
        ctx.save_for_backward(user_vecs, cand_vecs, w, z, m, lse, pos)
        ctx.temperature = temperature
        ctx.has_bias = bias is not None
        return lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        user_vecs, cand_vecs, w, z, m, lse, pos = ctx.saved_tensors
        B, K, D = user_vecs.shape
        C = cand_vecs.shape[0]
        u2 = user_vecs.reshape(B * K, D)
        scale = grad * torch.exp(m - lse)  # (B,): d lse / d logit = z * scale
        grad_pos = grad * torch.exp(pos - lse)
        grad_u = u2.new_empty(B * K, D) if ctx.needs_input_grad[1] else None
        grad_c = cand_vecs.new_zeros(C, D) if ctx.needs_input_grad[2] else None
        grad_bias = cand_vecs.new_zeros(C) if ctx.has_bias and ctx.needs_input_grad[3] else None
        for i, j in _row_chunks(B, K * C):
            # in place: neither block is read again
            g = z[i:j].mul_(scale[i:j].unsqueeze(1))  # (r, C)
            gk = w[i:j].mul_(g.unsqueeze(1)).view(-1, C)  # (r K, C): through each interest's share
            if grad_u is not None:
                torch.mm(gk, cand_vecs, out=grad_u[i * K:j * K])
            if grad_c is not None:
                grad_c.addmm_(gk.T, u2[i * K:j * K])
            if grad_bias is not None:
                grad_bias.add_(g.sum(0))
        t = ctx.temperature
        _BLOCKS.give(w, z)
        return (grad_pos, None if grad_u is None else grad_u.mul_(1.0 / t).view(B, K, D),
                None if grad_c is None else grad_c.mul_(1.0 / t), grad_bias, None, None)


# rows of users per pass of the multi-interest partition: a (rows, K, C) block of about 4 MB stays in
# the cache between its elementwise passes, where the whole block (214 MB at 4096 users x 3
# interests x 4352 candidates) went to memory and back on each
_CHUNK_FLOATS = 1 << 20


def _row_chunks(n_rows: int, row_floats: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_FLOATS // max(row_floats, 1))
    return [(i, min(n_rows, i + step)) for i in range(0, n_rows, step)]


def retrieval_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_rows: torch.Tensor,
                   sampling_logq: torch.Tensor | None = None, *, temperature: float = 0.05,
                   loss: str = "softmax", logq_correction: bool = True, mask_accidental_hits: bool = True,
                   in_batch_negatives: bool = True, history_mask: torch.Tensor | None = None,
                   hard_negatives: int = 0, weights: torch.Tensor | None = None,
                   reduction: str = "mean") -> torch.Tensor:
    """Mean (optionally ``weights``-weighted, (B,)) loss over the batch rows. See the module doc.

    ``reduction="none"``: the (B,) per-row losses, unweighted (a caller that spreads one batch over
    several processes normalises by the global weight itself)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B = user_vecs.shape[0]
    if loss == "positive":
        per_row = positive_only_loss(user_vecs, item_vecs[:B])
    else:
        fused = loss == "softmax"
        pos, neg_logits, excluded, offset = _parts(
            user_vecs, item_vecs, item_rows, sampling_logq, temperature=temperature,
            logq_correction=logq_correction, mask_accidental_hits=mask_accidental_hits,
            in_batch_negatives=in_batch_negatives, history_mask=history_mask, hard_negatives=hard_negatives,
            fused=fused)
        if fused:
            # cross-entropy of the positive: log-partition over {positive, usable negatives} - pos
            bias = None
            if logq_correction and sampling_logq is not None:
                bias = -sampling_logq.to(user_vecs.dtype)[offset:]
            fn = _SoftmaxPartition if user_vecs.dim() == 2 else _InterestPartition
            lse = fn.apply(pos, user_vecs, item_vecs[offset:], bias, excluded, temperature)
            per_row = lse - pos
        else:
            assert neg_logits is not None
            usable = ~excluded
            n_neg = usable.sum(1).clamp_min(1).to(neg_logits.dtype)  # (B,)
            if loss == "bpr":
                pair = F.softplus(neg_logits - pos.unsqueeze(1))  # -log sigmoid(pos - neg), (B, K)
                per_row = pair.masked_fill(excluded, 0.0).sum(1) / n_neg
            else:  # bce
                neg_term = F.softplus(neg_logits).masked_fill(excluded, 0.0).sum(1) / n_neg  # -log(1 - sigmoid)
                per_row = F.softplus(-pos) + neg_term  # -log sigmoid(pos) + mean negative term
    if reduction == "none":
        return per_row
    if weights is None:
        return per_row.mean()
    w = weights.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp_min(1e-12)


def positive_only_loss(user_vecs: torch.Tensor, pos_vecs: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cosine(user, positive): pulls each pair together and nothing apart (for (B, K, D)
    interests, the nearest interest)."""
    if user_vecs.dim() == 3:
        return 1.0 - F.cosine_similarity(user_vecs, pos_vecs.unsqueeze(1), dim=-1).amax(dim=1)
    return 1.0 - F.cosine_similarity(user_vecs, pos_vecs, dim=-1)
