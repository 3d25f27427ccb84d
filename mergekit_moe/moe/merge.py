"""Merging LoRA experts on their true deltas: linear, TIES, DARE-TIES, exact concatenation.

Every function works on one target module. A LoRA expert's delta is ``s * B @ A`` with
``A`` (r, in), ``B`` (out, r). Merging the factors A and B separately would create cross terms
``B_i A_j``; we merge the dense deltas (out, in) instead and refactor the result with a
truncated SVD back to low rank, or (``concat``) stack the ranks, which is exact.

Shapes: ``delta`` (out, in); factors returned as ``A`` (r, in) and ``B`` (out, r) with the scale
folded into ``B`` (so ``B @ A`` is the update itself).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..lora import LoraFactors

MERGE_METHODS = ("linear", "ties", "dare_ties", "concat")


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    """Default: the cluster's mean (1/n each), so a merged slot has the strength of one expert."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} deltas")
    return [float(w) for w in weights]


def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``sum_i w_i delta_i`` (out, in); default weights 1/n."""
    w = _weights(len(deltas), weights)
    out = torch.zeros_like(deltas[0], dtype=torch.float32)
    for wi, d in zip(w, deltas):
        out.add_(d.float(), alpha=wi)
    return out


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude (TIES step 1), zero the rest."""
    if density >= 1.0:
        return delta
    mag = delta.abs()
    flat = mag.view(-1)
    if flat.numel() > TRIM_SAMPLE:
        # large deltas: the magnitude threshold from a fixed, evenly strided sample (a full kthvalue over
        # ~1M entries per expert and module dominated compose time; the kept share stays ~density)
        flat = flat[:: flat.numel() // TRIM_SAMPLE]
    k = max(1, int(round(density * flat.numel())))
    # kthvalue of the (n-k+1)-th smallest = the k-th largest magnitude
    thresh = flat.kthvalue(flat.numel() - k + 1).values
    return delta * (mag >= thresh)


def _elect_and_merge(trimmed: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES steps 2-3: elect a sign per entry by total mass, average the entries that agree with it.

    Written as a loop over members with in-place accumulation: no (n, out, in) stack, a few
    passes over memory per member (these elementwise passes, not the SVD, dominate on CPU).
    """
    total = torch.zeros_like(trimmed[0])
    for t, w in zip(trimmed, weights):
        total.add_(t, alpha=w)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for t, w in zip(trimmed, weights):
        agree = (t * sign) > 0                     # nonzero and on the elected side
        num.addcmul_(t, agree, value=w)
        den.add_(agree, alpha=w)
    return num.div_(den.clamp_min_(1e-12))


def ties_merge(deltas: Sequence[torch.Tensor], density: float = 0.5, weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim to ``density``, elect signs, disjoint mean. (out, in)."""
    w = [1.0] * len(deltas) if weights is None else _weights(len(deltas), weights)
    return _elect_and_merge([_trim(d.float(), density) for d in deltas], w)


def dare_ties_merge(deltas: Sequence[torch.Tensor], density: float = 0.5, *, seed: int = 0,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2023) + TIES: drop entries with prob ``1 - density``, rescale by ``1/density``, then elect signs.

    The drop mask comes from a generator seeded with ``seed`` so a recipe composes reproducibly.
    """
    g = torch.Generator().manual_seed(int(seed))
    dropped = []
    for d in deltas:
        d = d.float()
        keep = torch.rand(d.shape, generator=g) < density
        dropped.append(torch.where(keep, d / density, torch.zeros_like(d)))
    w = [1.0] * len(deltas) if weights is None else _weights(len(deltas), weights)
    return _elect_and_merge(dropped, w)


#: above this size a dense merge is refactored with a randomized SVD (exact SVD of 576x1536 deltas,
#: hundreds of times per compose, is what made merging slow on CPU)
EXACT_SVD_MAX_DIM = 384
#: above this many entries, TIES trimming picks its magnitude threshold from a strided sample
TRIM_SAMPLE = 1 << 16


def svd_refactor(delta: torch.Tensor, rank: int, *, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (Eckart-Young): ``A`` (r, in), ``B`` (out, r), ``B @ A ~= delta``.

    The singular values are split evenly (``sqrt(S)`` on each side) so A and B have similar norms.
    Large matrices use ``torch.svd_lowrank`` (seeded, 4 power iterations: near-optimal for a truncation)
    unless ``exact``.
    """
    delta = delta.float()
    rank = max(1, min(int(rank), min(delta.shape)))
    if exact is None:
        exact = min(delta.shape) <= EXACT_SVD_MAX_DIM or rank * 4 >= min(delta.shape)
    if exact:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        V = Vh[:rank].T
    else:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)  # svd_lowrank draws a random sketch: keep compose reproducible
        try:
            U, S, V = torch.svd_lowrank(delta, q=min(rank + 10, min(delta.shape)), niter=4)
        finally:
            torch.random.set_rng_state(state)
        V = V[:, :rank]
    root = S[:rank].sqrt()
    return (root[:, None] * V.T).contiguous(), (U[:, :rank] * root[None, :]).contiguous()


def lowrank_refactor(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact truncated SVD of ``B @ A`` (A (R, in), B (out, R)) without forming it: QR of both factors,
    then the SVD of an R x R core. Equal to ``svd_refactor(B @ A, rank, exact=True)`` up to signs."""
    Qb, Rb = torch.linalg.qr(B.float())            # (out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.float().T)          # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)         # core (R, R)
    rank = max(1, min(int(rank), S.shape[0]))
    root = S[:rank].sqrt()
    return (root[:, None] * (Vh[:rank] @ Qa.T)).contiguous(), ((Qb @ U[:, :rank]) * root[None, :]).contiguous()


def relative_error(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||delta - B A||_F / ||delta||_F`` (0 when delta is zero)."""
    n = float(delta.float().norm())
    return 0.0 if n == 0 else float((delta.float() - B @ A).norm()) / n


def concat_factors(factors: Sequence[LoraFactors], weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the ranks exactly: ``A = [A_1; ...]`` (R, in), ``B = [w_1 s_1 B_1, ...]`` (out, R); ``B @ A == linear_merge``."""
    w = _weights(len(factors), weights)
    A = torch.cat([f.A.float() for f in factors], dim=0)
    B = torch.cat([f.B.float() * (f.scale * wi) for f, wi in zip(factors, w)], dim=1)
    return A.contiguous(), B.contiguous()


def merge_factors(factors: Sequence[LoraFactors], method: str, *, rank: int | None = None, density: float = 0.5,
                  seed: int = 0, weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one module's factors from a cluster of experts into one slot: ``(A (r, in), B (out, r))``.

    A single expert is returned as is (scale folded into B). ``concat`` is exact; ``linear``,
    ``ties``, ``dare_ties`` merge the dense deltas and refactor to ``rank`` (default: the largest
    member rank) with a truncated SVD.
    """
    if not factors:
        raise ValueError("nothing to merge")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r} (one of {', '.join(MERGE_METHODS)})")
    if len(factors) == 1 and method != "concat":
        f = factors[0]
        A, B = f.A.float(), f.B.float() * f.scale
        if rank is None or rank >= f.rank:
            return A.contiguous(), B.contiguous()
        return lowrank_refactor(A, B, rank)
    if method == "concat":
        return concat_factors(factors, weights)
    target = rank if rank is not None else max(f.rank for f in factors)
    if method == "linear":
        # the mean of the deltas is exactly the concatenation: refactor it without a dense matrix
        return lowrank_refactor(*concat_factors(factors, weights), target)
    deltas = [f.delta() for f in factors]
    if method == "ties":
        merged = ties_merge(deltas, density, weights)
    else:
        merged = dare_ties_merge(deltas, density, seed=seed, weights=weights)
    return svd_refactor(merged, target)
