"""FlexLoRA SVD redistribution, computed in factor space.

For the weighted sum dW = sum_k p_k s_k B_k A_k = Bs @ As with Bs (out, R) and As (R, in)
the stacked factors: QR Bs = Qb Rb, QR As^T = Qa Ra, so dW = Qb (Rb Ra^T) Qa^T; an SVD of
the small core Rb Ra^T = U S V^T gives dW = (Qb U) S (Qa V)^T. Cost O((out + in) R^2 + R^3)
in float64, without forming the dense (out, in) matrix (unless R > min(out, in) / 2, where
the dense SVD is no dearer). The R factors are taken from a Cholesky factorisation of the
(equilibrated) Gram matrices when those are well conditioned, else from Householder QR;
see `factor_svd`.

Global state between rounds: each device receives its own rank's truncation (the best
rank-r approximation, Eckart-Young) of the aggregated effective update.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .types import LoraUpdate
from .validation import probabilities, validate_rank, validate_updates


CHOLESKY_MIN_PIVOT = 1e-4  # on the unit-diagonal Gram: cond(B) up to ~1e4 takes the Gram route
DENSE_RANK_FRACTION = 0.5  # stacked rank R > this * min(out, in): SVD of the dense product instead


def factor_svd(B: torch.Tensor, A: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A from B (out, R), A (R, in) without forming the product.

    Returns U (out, k), S (k,), Vh (k, in) in float64 (S descending; k defaults to all
    min(out, in, R) singular triplets). Components whose B column or A row is zero are
    dropped first. Fast path ("Cholesky-QR"): the R factors come from Cholesky of the
    column-equilibrated Gram matrices (BLAS-3, out*R^2 flops) and only k singular vectors
    are mapped back by a triangular solve; when a Gram matrix is singular or
    ill-conditioned the Householder QR route is used instead (always stable). When the
    stacked rank R exceeds half of min(out, in), the factor route costs as much as the
    dense one, so the dense product B @ A is formed and decomposed directly.
    """
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    nb, na = B64.norm(dim=0), A64.norm(dim=1)  # (R,), (R,)
    keep = (nb > 0) & (na > 0)
    if not bool(keep.all()):
        B64, A64, nb, na = B64[:, keep], A64[keep], nb[keep], na[keep]
    R = int(B64.shape[1])
    if R == 0:
        z = torch.zeros(0, dtype=torch.float64)
        return torch.zeros(B.shape[0], 0, dtype=torch.float64), z, torch.zeros(0, A.shape[1], dtype=torch.float64)
    if R > min(B64.shape[0], A64.shape[1]) * DENSE_RANK_FRACTION:  # factor space saves nothing here
        return _dense_svd(B64 @ A64, R if k is None else min(k, R))  # rank(B A) <= R
    if R <= min(B64.shape[0], A64.shape[1]):
        fast = _gram_route(B64 / nb, A64 / na[:, None], nb, na, k)
        if fast is not None:
            return fast
    Qb, Rb = torch.linalg.qr(B64)  # (out, m1), (m1, R)
    Qa, Ra = torch.linalg.qr(A64.T)  # (in, m2), (m2, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (m1, m2)
    k = S.shape[0] if k is None else min(k, S.shape[0])
    return Qb @ U[:, :k], S[:k], Vh[:k] @ Qa.T


def _dense_svd(dW: torch.Tensor, k: int | None):
    """SVD of the dense float64 product dW (out, in), truncated to k triplets."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    k = S.shape[0] if k is None else min(k, S.shape[0])
    return U[:, :k], S[:k], Vh[:k]


def _gram_route(Bn: torch.Tensor, An: torch.Tensor, nb: torch.Tensor, na: torch.Tensor, k: int | None):
    """Cholesky-QR on unit-norm columns Bn (out, R) / rows An (R, in); None if ill-conditioned."""
    Lb, info_b = torch.linalg.cholesky_ex(Bn.T @ Bn)  # Bn = Qb Lb^T
    La, info_a = torch.linalg.cholesky_ex(An @ An.T)  # An^T = Qa La^T
    if int(info_b) or int(info_a):
        return None
    if float(torch.diagonal(Lb).min()) < CHOLESKY_MIN_PIVOT or float(torch.diagonal(La).min()) < CHOLESKY_MIN_PIVOT:
        return None
    Rb, Ra = Lb.T, La.T  # upper (R, R)
    core = (Rb * nb) @ (Ra * na).T  # B A = Qb [Rb diag(nb)] [Ra diag(na)]^T Qa^T
    U, S, Vh = torch.linalg.svd(core)
    k = S.shape[0] if k is None else min(k, S.shape[0])
    left = Bn @ torch.linalg.solve_triangular(Rb, U[:, :k], upper=True)  # Qb U_k, (out, k)
    right = torch.linalg.solve_triangular(Ra, Vh[:k].T, upper=True).T @ An  # V_k^T Qa^T, (k, in)
    return left, S[:k], right


def factors_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float = 1.0,
                     weight: float = 1.0) -> LoraUpdate:
    """Balanced rank-`rank` factors of U diag(S) Vh at `scale`: B = U sqrt(S/s), A = sqrt(S/s) Vh.

    Zero-pads when `rank` exceeds the number of singular values.
    """
    k = min(rank, S.shape[0])
    root = torch.sqrt(S[:k] / float(scale))  # (k,)
    B = torch.zeros(U.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64)
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return LoraUpdate(A=A.float(), B=B.float(), scale=float(scale), weight=weight)


def stacked_factors(updates: Sequence[LoraUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 Bs (out, R) = cat p_k s_k B_k, As (R, in) = cat A_k for validated updates."""
    p = probabilities(updates)
    Bs = torch.cat([p[k] * u.scale * u.B.to(torch.float64) for k, u in enumerate(updates)], dim=1)
    As = torch.cat([u.A.to(torch.float64) for u in updates], dim=0)
    return Bs, As


def svd_redistribute(updates: Sequence[LoraUpdate], ranks: Sequence[int],
                     scales: Sequence[float] | None = None) -> list[LoraUpdate]:
    """Best rank-r approximation of sum_k p_k s_k B_k A_k for each r in `ranks`.

    Returns one LoraUpdate per requested rank with A (r, in), B (out, r) and scale 1.0, or
    `scales[i]` when given (e.g. the device's alpha / r). Singular values are split
    sqrt(S) between the factors. A rank larger than the aggregate's rank is zero-padded.
    """
    ups = validate_updates(updates)
    ranks = [validate_rank(r, f"requested rank {i}") for i, r in enumerate(ranks)]
    if not ranks:
        raise ValueError("svd_redistribute needs at least one requested rank")
    if scales is not None and len(scales) != len(ranks):
        raise ValueError(f"got {len(scales)} scales for {len(ranks)} ranks; pass one scale per rank")
    for i, s in enumerate(scales or []):
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(f"requested scale {i} must be a finite positive number, got {s!r}")
    Bs, As = stacked_factors(ups)
    U, S, Vh = factor_svd(Bs, As, k=max(ranks))
    total = float(sum(u.weight for u in ups))
    return [factors_from_svd(U, S, Vh, r, 1.0 if scales is None else float(scales[i]), total)
            for i, r in enumerate(ranks)]


def recompress(u: LoraUpdate, cap: int) -> tuple[LoraUpdate, float]:
    """(the same update at rank <= cap with scale 1, ||discarded||_F / ||s B @ A||_F).

    Exact (error 0) when rank(B @ A) <= cap, else the best rank-cap approximation.
    """
    if u.rank <= cap:
        return u, 0.0
    U, S, Vh = factor_svd(u.B * u.scale, u.A)
    total = float(S.pow(2).sum().sqrt())
    err = float(S[cap:].pow(2).sum().sqrt()) / total if total > 0 else 0.0
    return factors_from_svd(U, S, Vh, cap, 1.0, u.weight), err
