"""Negative samplers: their distributions and the log-probabilities the logQ correction subtracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.samplers import (
    HardNegativeSampler,
    HistoryMask,
    InBatchSampler,
    MixedSampler,
    PopularitySampler,
    UniformSampler,
    make_sampler,
)

COUNTS = np.array([1000, 300, 100, 30, 10, 0, 5, 1], dtype=np.float64)  # item rows 1..8


def _freq(rows: torch.Tensor, n: int) -> np.ndarray:
    return np.bincount(rows.numpy(), minlength=n + 1) / len(rows)


def test_uniform_draws_every_catalogue_item_equally_and_never_padding() -> None:
    s = UniformSampler(8, COUNTS, num_negatives=40_000)
    g = torch.Generator().manual_seed(0)
    f = _freq(s.extra(256, g), 8)
    assert f[0] == 0.0  # row 0 is padding / OOV
    np.testing.assert_allclose(f[1:], 1 / 8, atol=0.01)
    # expected appearances per batch: M / N for every item
    lq = s.log_expected_count(torch.tensor([1, 5, 8]), 256)
    np.testing.assert_allclose(lq.numpy(), math.log(40_000 / 8), rtol=1e-6)


def test_popularity_follows_count_to_the_power_alpha() -> None:
    s = PopularitySampler(8, COUNTS, num_negatives=200_000, alpha=0.75)
    g = torch.Generator().manual_seed(1)
    f = _freq(s.extra(256, g), 8)[1:]
    expect = COUNTS ** 0.75 / (COUNTS ** 0.75).sum()
    np.testing.assert_allclose(f, expect, atol=0.004)
    assert f[5] == 0.0  # an item never seen in training is never drawn
    # flatter than raw popularity: the head is under-sampled relative to its count share
    assert f[0] < COUNTS[0] / COUNTS.sum()
    lq = s.log_expected_count(torch.tensor([1, 2]), 256)
    np.testing.assert_allclose(lq.numpy(), np.log(expect[:2] * 200_000), rtol=1e-5)


def test_popularity_alpha_zero_is_uniform() -> None:
    s = PopularitySampler(8, COUNTS, num_negatives=70_000, alpha=0.0)
    f = _freq(s.extra(1, torch.Generator().manual_seed(2)), 8)[1:]
    np.testing.assert_allclose(f, 1 / 8, atol=0.01)  # count^0 = 1 for every item, unseen ones included


def test_inbatch_expected_count_is_batch_size_times_label_frequency() -> None:
    s = InBatchSampler(8, COUNTS)
    assert s.in_batch and s.num_extra == 0 and len(s.extra(64)) == 0
    lq = s.log_expected_count(torch.tensor([1, 3]), 64)
    p = COUNTS / COUNTS.sum()
    np.testing.assert_allclose(lq.numpy(), np.log(64 * p[[0, 2]]), rtol=1e-6)
    # an item never seen as a label still gets a finite value (half an occurrence)
    assert math.isfinite(float(s.log_expected_count(torch.tensor([6]), 64)[0]))


def test_mixed_combines_both_proposals() -> None:
    s = MixedSampler(8, COUNTS, num_negatives=16)
    assert s.in_batch and s.num_extra == 16
    p = COUNTS / COUNTS.sum()
    lq = s.log_expected_count(torch.tensor([1, 8]), 32)
    np.testing.assert_allclose(lq.numpy(), np.log(32 * p[[0, 7]] + 16 / 8), rtol=1e-6)


def test_hard_sampler_is_a_uniform_pool_plus_a_per_row_cut() -> None:
    from training.losses import retrieval_logits

    s = HardNegativeSampler(8, COUNTS, num_negatives=40_000, hard_negatives=3)
    assert s.hard_negatives == 3 and s.num_extra == 40_000 and s.in_batch
    # the pool: uniform over the catalogue, never padding; with the in-batch positives the
    # candidates are those of the mixed sampler, and so is their logQ
    f = _freq(s.extra(4, torch.Generator().manual_seed(0)), 8)
    assert f[0] == 0.0
    np.testing.assert_allclose(f[1:], 1 / 8, atol=0.01)
    rows = torch.tensor([1, 5, 8])
    mixed = MixedSampler(8, COUNTS, num_negatives=40_000)
    torch.testing.assert_close(s.log_expected_count(rows, 4), mixed.log_expected_count(rows, 4))

    # the cut: per row, exactly the 3 highest-scoring candidates that are neither its positive nor
    # an accidental hit stay negatives
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1)  # (B, D)
    cand_rows = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 2, 7])  # 4 positives, then a pool of 6 (2 repeats)
    v = torch.nn.functional.normalize(torch.randn(10, 6, generator=g), dim=1)  # (C, D)
    v[8] = v[1]  # the same item has the same vector wherever it appears
    _, neg = retrieval_logits(u, v, cand_rows, None, in_batch_negatives=True, hard_negatives=3)
    scores = u @ v.T
    for i in range(4):
        allowed = [j for j in range(10) if cand_rows[j] != cand_rows[i]]
        kept = torch.nonzero(neg[i]).flatten().tolist()
        assert len(kept) == 3 and set(kept) <= set(allowed), (i, kept)
        # the three highest scores (a repeated item may stand in for its twin: same score)
        top3 = sorted((float(scores[i, j]) for j in allowed), reverse=True)[:3]
        assert sorted((float(scores[i, j]) for j in kept), reverse=True) == top3, i


def test_same_generator_seed_same_negatives() -> None:
    s = make_sampler("popularity", 8, COUNTS, num_negatives=100)
    a = s.extra(4, torch.Generator().manual_seed(7))
    b = s.extra(4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_make_sampler_rejects_unknown_names_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="unknown negative sampler"):
        make_sampler("random", 8, COUNTS)
    with pytest.raises(ValueError, match="num_negatives"):
        UniformSampler(8, COUNTS, num_negatives=0)
    with pytest.raises(ValueError, match="counts has shape"):
        InBatchSampler(8, np.ones(3))
    assert make_sampler("none", 8, COUNTS).num_extra == 0


@pytest.mark.parametrize("dense_limit", [10**9, 0])  # dense matrix and sorted-key lookup
def test_history_mask_marks_exactly_the_users_items(dense_limit: int) -> None:
    users = np.array([1, 1, 2, 3])
    items = np.array([4, 5, 4, 1])
    hm = HistoryMask.build(users, items, n_user_rows=4, n_item_rows=9, dense_limit=dense_limit)
    got = hm(torch.tensor([1, 2, 3, 0]), torch.tensor([4, 5, 1, 0, 7]))
    expect = torch.tensor([
        [True, True, False, False, False],
        [True, False, False, False, False],
        [False, False, True, False, False],
        [False, False, False, False, False],  # the unknown user has no history
    ])
    assert torch.equal(got, expect)
