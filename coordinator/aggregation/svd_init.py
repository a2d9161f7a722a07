"""FeDeRA initialisation (Yan et al., 2024): LoRA factors from the principal singular directions of
the pretrained weight, with the principal part moved out of the frozen base so that the initial
model is unchanged (as in PiSSA).

W (out, in) = U S Vh; at rank r and LoRA scale s the adapter starts at
B0 = U_r sqrt(S_r / s) (out, r), A0 = sqrt(S_r / s) Vh_r (r, in), so s B0 A0 = U_r S_r Vh_r,
and every model's base becomes W - s B0 A0 (the residual, merged as a base delta).
"""
from __future__ import annotations

import torch


def svd_init_factors(W: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (rank, in), B0 (out, rank)) float32 with scale * B0 @ A0 = the best rank-`rank`
    approximation of W (out, in); the singular values are split evenly between the factors."""
    if W.dim() != 2:
        raise ValueError(f"svd_init_factors: expected a 2-D weight (out, in), got shape {tuple(W.shape)}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"svd_init_factors: rank {rank} must be in [1, {min(W.shape)}] for a weight "
                         f"of shape {tuple(W.shape)}")
    if not scale > 0:
        raise ValueError(f"svd_init_factors: the LoRA scale must be positive, got {scale}")
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = (S[:rank] / scale).sqrt()  # (rank,)
    return (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root[None, :]).float()
