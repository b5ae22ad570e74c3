"""Retrieval losses on tiny hand-made inputs: values, logQ correction, accidental-hit masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import interest_scores, retrieval_logits, retrieval_loss


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


# two users, three candidates: positives (rows 10, 20) then one extra negative (row 30)
U = _unit([1.0, 0.0], [0.0, 1.0])
V = _unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
ROWS = torch.tensor([10, 20, 30])
T = 0.5


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u @ v.T


def test_softmax_loss_matches_a_hand_computation() -> None:
    s = _cos(U, V) / T  # (2, 3)
    by_hand = torch.stack([torch.logsumexp(s[i], 0) - s[i, i] for i in range(2)]).mean()
    got = retrieval_loss(U, V, ROWS, None, temperature=T, logq_correction=False)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)


def test_logq_correction_subtracts_log_q_from_every_logit() -> None:
    logq = torch.tensor([math.log(0.5), math.log(0.1), math.log(0.02)], dtype=torch.float64)
    plain, _ = retrieval_logits(U, V, ROWS, logq, temperature=T, logq_correction=False)
    corrected, _ = retrieval_logits(U, V, ROWS, logq, temperature=T, logq_correction=True)
    torch.testing.assert_close(corrected, plain - logq.unsqueeze(0))
    # and the loss is the softmax of exactly those corrected logits
    by_hand = torch.stack([torch.logsumexp(corrected[i], 0) - corrected[i, i] for i in range(2)]).mean()
    got = retrieval_loss(U, V, ROWS, logq, temperature=T, logq_correction=True)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)
    # a frequently sampled negative is penalised less after correction: the loss drops
    assert float(got) != pytest.approx(float(retrieval_loss(U, V, ROWS, logq, temperature=T, logq_correction=False)))


def test_a_negative_equal_to_the_rows_positive_is_masked() -> None:
    rows = torch.tensor([10, 20, 10])  # the extra "negative" is user 0's own positive
    v = _unit([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])
    _, neg = retrieval_logits(U, v, rows, temperature=T)
    assert neg.tolist() == [[False, True, False], [True, False, True]]
    s = _cos(U, v) / T
    # user 0: only candidate 1 is a negative; user 1: candidates 0 and 2
    by_hand = ((torch.logsumexp(s[0, [0, 1]], 0) - s[0, 0]) + (torch.logsumexp(s[1, [0, 1, 2]], 0) - s[1, 1])) / 2
    got = retrieval_loss(U, v, rows, None, temperature=T, logq_correction=False)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)
    unmasked = retrieval_loss(U, v, rows, None, temperature=T, logq_correction=False, mask_accidental_hits=False)
    assert float(unmasked) > float(got)  # its own positive as a negative can only hurt


def test_duplicate_positives_in_a_batch_are_not_each_others_negatives() -> None:
    rows = torch.tensor([10, 10])  # two users whose positive is the same item
    v = _unit([1.0, 0.0], [1.0, 0.0])
    _, neg = retrieval_logits(U, v, rows, temperature=T)
    assert not neg.any()
    loss = retrieval_loss(U, v, rows, None, temperature=T)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)  # the positive alone in its partition


def test_history_items_are_masked_when_asked() -> None:
    hist = torch.tensor([[False, False, True], [False, False, False]])  # row 30 is in user 0's history
    _, neg = retrieval_logits(U, V, ROWS, temperature=T, history_mask=hist)
    assert neg.tolist() == [[False, True, False], [True, False, True]]
    with_mask = retrieval_loss(U, V, ROWS, None, temperature=T, history_mask=hist, logq_correction=False)
    without = retrieval_loss(U, V, ROWS, None, temperature=T, logq_correction=False)
    assert float(with_mask) < float(without)


def test_without_in_batch_negatives_only_the_extra_items_compete() -> None:
    _, neg = retrieval_logits(U, V, ROWS, temperature=T, in_batch_negatives=False)
    assert neg.tolist() == [[False, False, True], [False, False, True]]
    s = _cos(U, V) / T
    by_hand = torch.stack([torch.logsumexp(s[i, [i, 2]], 0) - s[i, i] for i in range(2)]).mean()
    got = retrieval_loss(U, V, ROWS, None, temperature=T, in_batch_negatives=False, logq_correction=False)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)


def test_hard_negatives_keep_the_highest_scoring_ones() -> None:
    u = _unit([1.0, 0.0])
    v = _unit([1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0])
    rows = torch.tensor([1, 2, 3, 4])
    _, neg = retrieval_logits(u, v, rows, temperature=T, hard_negatives=1)
    assert neg.tolist() == [[False, True, False, False]]  # the closest non-positive


def test_bpr_and_bce_values() -> None:
    s = _cos(U, V) / T
    pos = s.diagonal()
    bpr = torch.stack([(F.softplus(-(pos[i] - s[i, [j for j in range(3) if j != i]]))).mean() for i in range(2)]).mean()
    got = retrieval_loss(U, V, ROWS, None, temperature=T, loss="bpr", logq_correction=False)
    assert float(got) == pytest.approx(float(bpr), rel=1e-12)
    bce = torch.stack([F.softplus(-pos[i]) + F.softplus(s[i, [j for j in range(3) if j != i]]).mean()
                       for i in range(2)]).mean()
    got = retrieval_loss(U, V, ROWS, None, temperature=T, loss="bce", logq_correction=False)
    assert float(got) == pytest.approx(float(bce), rel=1e-12)


def test_positive_only_loss_pulls_pairs_together_and_ignores_negatives() -> None:
    got = retrieval_loss(U, V, ROWS, None, loss="positive")
    assert float(got) == pytest.approx(0.0, abs=1e-12)  # every user equals its positive
    far = retrieval_loss(U, _unit([0.0, 1.0], [1.0, 0.0], [1.0, 1.0]), ROWS, None, loss="positive")
    assert float(far) == pytest.approx(1.0)


def test_fused_softmax_gradients_match_autograd() -> None:
    torch.manual_seed(0)
    u = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=-1).requires_grad_()
    rows = torch.tensor([1, 2, 3, 1, 5, 6, 2, 8, 9])
    logq = torch.randn(9, dtype=torch.float64)
    loss = retrieval_loss(u, v, rows, logq, temperature=0.2)
    gu, gv = torch.autograd.grad(loss, (u, v))
    logits, neg = retrieval_logits(u, v, rows, logq, temperature=0.2)
    keep = neg | torch.eye(5, 9, dtype=torch.bool)
    ref = (torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits.diagonal()).mean()
    ru, rv = torch.autograd.grad(ref, (u, v))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gv, rv)


def test_multi_interest_softmax_is_the_soft_maximum_over_interests() -> None:
    """(B, K, D) users: logit_ij = logsumexp_k(u_ik . v_j / t) - logq_j; the fused loss and its
    gradients equal that definition written out with autograd."""
    torch.manual_seed(1)
    u = F.normalize(torch.randn(5, 3, 4, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=-1).requires_grad_()
    rows = torch.tensor([1, 2, 3, 1, 5, 6, 2, 8, 9])
    logq = torch.randn(9, dtype=torch.float64)
    loss = retrieval_loss(u, v, rows, logq, temperature=0.2)
    gu, gv = torch.autograd.grad(loss, (u, v))
    logits = torch.logsumexp(torch.einsum("bkd,cd->bkc", u, v) / 0.2, dim=1) - logq  # (B, C)
    _, neg = retrieval_logits(u, v, rows, logq, temperature=0.2)
    keep = neg | torch.eye(5, 9, dtype=torch.bool)
    assert not keep[0, 3] and not keep[3, 0]  # rows 0 and 3 share item 1: an accidental hit
    ref = (torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits.diagonal()).mean()
    ru, rv = torch.autograd.grad(ref, (u, v))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gv, rv)
    assert (gu.norm(dim=-1) > 0).all()  # every interest learns, not only the nearest one


@pytest.mark.parametrize("loss", ["softmax", "bpr", "bce", "positive"])
def test_one_interest_is_the_single_vector_model(loss: str) -> None:
    torch.manual_seed(2)
    u = F.normalize(torch.randn(4, 3), dim=-1)
    v = F.normalize(torch.randn(7, 3), dim=-1)
    rows = torch.arange(1, 8)
    logq = torch.randn(7)
    one = retrieval_loss(u.unsqueeze(1), v, rows, logq, loss=loss, hard_negatives=2 if loss == "bpr" else 0)
    torch.testing.assert_close(one, retrieval_loss(u, v, rows, logq, loss=loss, hard_negatives=2 if loss == "bpr" else 0))


def test_an_item_matching_any_interest_ranks_first() -> None:
    """Two unrelated tastes: each interest's items score as high as if the user had only that one;
    one vector between them (their mean) gives both only cos 45 degrees."""
    u = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, 2, 3)
    items = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]).float()
    got = interest_scores(u, items)[0]
    torch.testing.assert_close(got[:3], torch.tensor([1.0, 1.0, 0.0]))
    mean = F.normalize(u.mean(1), dim=-1)
    torch.testing.assert_close(interest_scores(mean, items)[0, :2], torch.full((2,), 0.5 ** 0.5))
    many = torch.randn(300, 4, 3)  # more users than one block of the scorer
    torch.testing.assert_close(interest_scores(many, items), torch.einsum("bkd,cd->bkc", many, items).amax(1))


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        retrieval_loss(U, V, ROWS, loss="hinge")
    with pytest.raises(ValueError, match="at least one candidate"):
        retrieval_loss(U, V[:1], ROWS[:1])
    with pytest.raises(ValueError, match="temperature"):
        retrieval_loss(U, V, ROWS, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        retrieval_loss(U.unsqueeze(0).unsqueeze(0), V, ROWS)  # (1, 1, B, D): neither (B, D) nor (B, K, D)


@pytest.mark.parametrize("mask_hits,in_batch", [(True, True), (True, False), (False, True), (False, False)])
def test_excluded_cells_are_the_hits_and_padding_of_the_dense_definition(mask_hits: bool, in_batch: bool) -> None:
    """The fused loss lists its excluded cells by a sort-merge join; they are exactly the cells the
    dense comparison marks: the row's own positive wherever it appears, and padding candidates."""
    from training.losses import _dense_cells, _excluded_cells

    g = torch.Generator().manual_seed(3)
    for B, extra in [(1, 0), (7, 5), (64, 40)]:
        pos = torch.randint(1, 12, (B,), generator=g)  # few distinct items: many duplicates
        cand = torch.cat([pos, torch.randint(0, 12, (extra,), generator=g)]) if in_batch else \
            torch.randint(0, 12, (extra + 1,), generator=g)
        got = _dense_cells(_excluded_cells(pos, cand, mask_hits, in_batch), B, cand.shape[0])
        want = (cand.unsqueeze(0) == pos.unsqueeze(1)) if mask_hits else torch.zeros(B, cand.shape[0], dtype=torch.bool)
        if not mask_hits and in_batch:
            want |= torch.eye(B, cand.shape[0], dtype=torch.bool)
        want |= (cand == 0).unsqueeze(0)
        assert torch.equal(got, want)


@pytest.mark.parametrize("interests", [1, 3])
def test_losses_built_before_either_backward_keep_their_own_gradients(interests: int) -> None:
    """The fused losses reuse their (B, C) blocks from one backward to the next forward; two losses
    alive at once (gradient accumulation) must still each get their own numbers, and a second
    backward through a graph whose block was reused must fail rather than read another's block."""
    torch.manual_seed(1)
    shape = (6, interests, 8) if interests > 1 else (6, 8)
    u1, u2 = (F.normalize(torch.randn(*shape), dim=-1).requires_grad_() for _ in range(2))
    v = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
    rows = torch.arange(1, 10)

    def grads(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(retrieval_loss(u, v, rows, None, temperature=0.1), (u, v))

    want1, want2 = grads(u1), grads(u2)
    l1 = retrieval_loss(u1, v, rows, None, temperature=0.1)
    l2 = retrieval_loss(u2, v, rows, None, temperature=0.1)
    for got, want in zip(torch.autograd.grad(l2, (u2, v)) + torch.autograd.grad(l1, (u1, v)), want2 + want1, strict=True):
        torch.testing.assert_close(got, want)

    kept = retrieval_loss(u1, v, rows, None, temperature=0.1)
    kept.backward(retain_graph=True)
    retrieval_loss(u2, v, rows, None, temperature=0.1).backward()  # takes the block ``kept`` gave back
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kept.backward()


@pytest.mark.parametrize("temperature", [0.1, 0.01])  # the direct exp and the max-shifted path
@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_multi_interest_loss_in_row_chunks_matches_autograd(monkeypatch: pytest.MonkeyPatch, temperature: float,
                                                            chunk_rows: int) -> None:
    """The multi-interest partition runs over a few users at a time (so each block stays in cache):
    any chunking gives the loss and gradients of the plain autograd formula, accidental hits,
    padding candidates and the logQ correction included."""
    from training import losses

    B, K, C, D = 7, 3, 12, 5
    monkeypatch.setattr(losses, "_CHUNK_FLOATS", chunk_rows * K * C)
    torch.manual_seed(2)
    u = F.normalize(torch.randn(B, K, D, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(C, D, dtype=torch.float64), dim=-1).requires_grad_()
    rows = torch.tensor([4, 2, 4, 7, 1, 9, 2, 4, 0, 3, 7, 5])  # repeats, and a padding row (0)
    logq = torch.randn(C, dtype=torch.float64)
    loss = retrieval_loss(u, v, rows, logq, temperature=temperature)
    gu, gv = torch.autograd.grad(loss, (u, v))
    logits = torch.logsumexp(torch.einsum("bkd,cd->bkc", u, v) / temperature, dim=1) - logq  # (B, C)
    neg = (rows.unsqueeze(0) != rows[:B].unsqueeze(1)) & (rows != 0).unsqueeze(0)
    keep = neg | torch.eye(B, C, dtype=torch.bool)
    ref = (torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits.diagonal()).mean()
    ru, rv = torch.autograd.grad(ref, (u, v))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(gu, ru)
    torch.testing.assert_close(gv, rv)
