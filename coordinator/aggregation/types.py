"""The LoRA update value type and small conversions between scales and ranks.

Conventions (peft): A is (r, in), B is (out, r); the effective update is dW = scale * B @ A.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraUpdate:
    """One device's (or the global) LoRA factors for one target module."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float  # s, so dW = scale * B @ A
    weight: float = 1.0  # aggregation weight, e.g. number of local examples

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the effective update."""
        return int(self.B.shape[0]), int(self.A.shape[1])


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """peft scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"lora alpha must be finite and non-zero, got {alpha}")
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def effective(update: LoraUpdate, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense dW = scale * B @ A, shape (out, in). For tests and small modules only."""
    return update.scale * (update.B.to(dtype) @ update.A.to(dtype))


def to_scale(update: LoraUpdate, target_scale: float) -> LoraUpdate:
    """Same effective update expressed with `target_scale`: B <- B * scale / target_scale."""
    if not math.isfinite(target_scale) or target_scale == 0:
        raise ValueError(f"target scale must be finite and non-zero, got {target_scale}")
    factor = float(update.scale) / float(target_scale)
    B = (update.B.to(torch.float64) * factor).to(torch.float32)
    return LoraUpdate(A=update.A.to(torch.float32), B=B, scale=float(target_scale), weight=update.weight)


def rescale_balanced(update: LoraUpdate, target_scale: float) -> LoraUpdate:
    """Same effective update with `target_scale`, dividing sqrt(scale/target) into both factors."""
    if not math.isfinite(target_scale) or target_scale <= 0 or update.scale <= 0:
        raise ValueError(f"balanced rescaling needs positive scales, got {update.scale} -> {target_scale}")
    f = math.sqrt(float(update.scale) / float(target_scale))
    return LoraUpdate(A=(update.A.to(torch.float64) * f).float(), B=(update.B.to(torch.float64) * f).float(),
                      scale=float(target_scale), weight=update.weight)


def truncate(update: LoraUpdate, rank: int) -> LoraUpdate:
    """Zero-pad download: rows [:rank] of A and columns [:, :rank] of B (zero-padded if rank > r)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank <= update.rank:
        return LoraUpdate(A=update.A[:rank].clone(), B=update.B[:, :rank].clone(), scale=update.scale, weight=update.weight)
    return pad(update, rank)


def pad(update: LoraUpdate, rank: int) -> LoraUpdate:
    """Append zero rows to A (rank, in) and zero columns to B (out, rank); dW is unchanged."""
    r = update.rank
    if rank < r:
        raise ValueError(f"cannot pad a rank-{r} update down to rank {rank}; use truncate()")
    A = torch.zeros(rank, update.A.shape[1], dtype=update.A.dtype)
    B = torch.zeros(update.B.shape[0], rank, dtype=update.B.dtype)
    A[:r] = update.A
    B[:, :r] = update.B
    return LoraUpdate(A=A, B=B, scale=update.scale, weight=update.weight)
