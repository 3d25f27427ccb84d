"""Merging on true deltas: linear, TIES, DARE-TIES, exact concat, truncated-SVD refactor."""

from __future__ import annotations

import pytest
import torch

from mergekit_moe.lora import LoraFactors
from mergekit_moe.moe.merge import (concat_factors, dare_ties_merge, linear_merge, merge_factors, relative_error, svd_refactor,
                                    ties_merge)


def lora(seed: int, r: int = 4, out: int = 24, inp: int = 16, scale: float = 2.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors("m", torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scale)


def test_concat_is_exact_and_equals_the_linear_merge():
    fs = [lora(0, r=2), lora(1, r=4), lora(2, r=3)]
    A, B = concat_factors(fs)
    assert A.shape == (9, 16) and B.shape == (24, 9)
    expected = linear_merge([f.delta() for f in fs])
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-5)
    # with explicit weights (e.g. sum instead of mean)
    A, B = concat_factors(fs, [1.0, 1.0, 1.0])
    torch.testing.assert_close(B @ A, sum(f.delta() for f in fs), rtol=1e-5, atol=1e-5)


def test_svd_refactor_is_exact_at_full_rank_and_optimal_below():
    fs = [lora(0), lora(1)]
    merged = linear_merge([f.delta() for f in fs])  # rank <= 8
    A, B = svd_refactor(merged, 8)
    assert relative_error(merged, A, B) < 1e-5
    A4, B4 = svd_refactor(merged, 4)
    S = torch.linalg.svdvals(merged)
    # Eckart-Young: the residual energy is exactly the dropped singular values
    assert abs(float((merged - B4 @ A4).norm()) - float(S[4:].norm())) < 1e-3
    assert A4.shape == (4, 16) and B4.shape == (24, 4)


def test_single_expert_is_kept_exactly_with_scale_folded_in():
    f = lora(3, scale=0.5)
    A, B = merge_factors([f], "ties")
    torch.testing.assert_close(B @ A, f.delta(), rtol=1e-5, atol=1e-6)


def test_ties_elects_signs_and_keeps_disjoint_entries():
    a = torch.tensor([[2.0, 0.0, -1.0, 0.1]])
    b = torch.tensor([[1.0, 3.0, 2.0, -0.1]])
    out = ties_merge([a, b], density=1.0)
    # entry 0: both positive -> mean 1.5; entry 1: only b -> 3; entry 2: sign +1 wins (2 > 1) -> 2; entry 3: tie-ish
    assert out[0, 0] == pytest.approx(1.5)
    assert out[0, 1] == pytest.approx(3.0)
    assert out[0, 2] == pytest.approx(2.0)
    trimmed = ties_merge([a, b], density=0.5)  # keeps the top 2 magnitudes of each
    assert trimmed[0, 3] == 0


def test_dare_is_seeded_and_unbiased_on_average():
    d = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    x1 = dare_ties_merge([d], density=0.5, seed=7)
    x2 = dare_ties_merge([d], density=0.5, seed=7)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, dare_ties_merge([d], density=0.5, seed=8))
    kept = x1 != 0
    assert 0.4 < float(kept.float().mean()) < 0.6
    torch.testing.assert_close(x1[kept], d[kept] * 2)  # rescaled by 1/density


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_merge_factors_refactors_to_the_largest_member_rank_by_default(method):
    fs = [lora(0, r=4), lora(1, r=4)]
    A, B = merge_factors(fs, method, density=0.7)
    assert A.shape == (4, 16) and B.shape == (24, 4)
    A, B = merge_factors(fs, method, rank=6, density=0.7)
    assert A.shape[0] == 6


def test_merging_does_not_create_cross_terms():
    # two experts acting on disjoint input/output subspaces: the linear merge is their mean, exactly
    A1 = torch.zeros(2, 8); A1[:, :4] = torch.randn(2, 4)
    B1 = torch.zeros(8, 2); B1[:4] = torch.randn(4, 2)
    A2 = torch.zeros(2, 8); A2[:, 4:] = torch.randn(2, 4)
    B2 = torch.zeros(8, 2); B2[4:] = torch.randn(4, 2)
    f1, f2 = LoraFactors("m", A1, B1, 1.0), LoraFactors("m", A2, B2, 1.0)
    A, B = merge_factors([f1, f2], "linear", rank=4)
    torch.testing.assert_close(B @ A, (f1.delta() + f2.delta()) / 2, rtol=1e-4, atol=1e-5)
    # naive factor averaging ((B1+B2)/2)((A1+A2)/2) has cross terms B1 A2 != 0
    naive = ((B1 + B2) / 2) @ ((A1 + A2) / 2)
    assert float((naive - (f1.delta() + f2.delta()) / 2).norm()) > 1e-3


def test_lowrank_refactor_equals_the_dense_truncated_svd():
    from mergekit_moe.moe.merge import lowrank_refactor

    fs = [lora(0, r=4, out=40, inp=50), lora(1, r=6, out=40, inp=50)]
    A, B = concat_factors(fs)
    dense = B @ A
    for rank in (3, 10):
        a1, b1 = lowrank_refactor(A, B, rank)
        a2, b2 = svd_refactor(dense, rank, exact=True)
        torch.testing.assert_close(b1 @ a1, b2 @ a2, rtol=1e-4, atol=1e-4)


def test_randomized_svd_on_large_deltas_is_near_optimal_and_reproducible():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(400, 8, generator=g) @ torch.randn(8, 420, generator=g) + 0.01 * torch.randn(400, 420, generator=g)
    A, B = svd_refactor(big, 8)                       # randomized (min dim 400 > 384)
    Ae, Be = svd_refactor(big, 8, exact=True)
    assert float((big - B @ A).norm()) <= float((big - Be @ Ae).norm()) * 1.01
    A2, B2 = svd_refactor(big, 8)
    assert torch.equal(A, A2) and torch.equal(B, B2)


def test_ties_trim_keeps_about_density_on_large_deltas():
    from mergekit_moe.moe.merge import TRIM_SAMPLE, _trim

    d = torch.randn(600, 700, generator=torch.Generator().manual_seed(1))
    assert d.numel() > TRIM_SAMPLE  # the sampled-threshold path
    for density in (0.2, 0.5, 0.8):
        kept = float((_trim(d, density) != 0).float().mean())
        assert abs(kept - density) < 0.02, (density, kept)
