"""FlexLoRA SVD redistribution, computed in factor space.

For the weighted sum dW = sum_k p_k s_k B_k A_k = Bs @ As with Bs (out, R) and As (R, in)
the stacked factors: QR Bs = Qb Rb, QR As^T = Qa Ra, so dW = Qb (Rb Ra^T) Qa^T; an SVD of
the small core Rb Ra^T = U S V^T gives dW = (Qb U) S (Qa V)^T. Cost O((out + in) R^2 + R^3)
in float64, never forming the dense (out, in) matrix.

Global state between rounds: each device receives its own rank's truncation (the best
rank-r approximation, Eckart-Young) of the aggregated effective update.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LoraUpdate
from .validation import probabilities, validate_rank, validate_updates


def factor_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A from B (out, R), A (R, in) without forming it.

    Returns U (out, k), S (k,), Vh (k, in) in float64, k = min(out, in, R), S descending.
    """
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    Qb, Rb = torch.linalg.qr(B64)  # (out, m1), (m1, R)
    Qa, Ra = torch.linalg.qr(A64.T)  # (in, m2), (m2, R)
    core = Rb @ Ra.T  # (m1, m2)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)  # (m1, k), (k,), (k, m2)
    return Qb @ U, S, Vh @ Qa.T


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
    Bs, As = stacked_factors(ups)
    U, S, Vh = factor_svd(Bs, As)
    total = float(sum(u.weight for u in ups))
    return [factors_from_svd(U, S, Vh, r, 1.0 if scales is None else float(scales[i]), total)
            for i, r in enumerate(ranks)]
