"""FedSA-LoRA: only A is shared and averaged; each device keeps its own B locally.

Global state between rounds: one A at the largest rank; a device of rank r downloads rows
[:r] of it and keeps its own B. Scales stay with the devices (A carries no scale).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LoraUpdate
from .validation import padding_rank, probabilities, validate_updates


def fedsa(updates: Sequence[LoraUpdate], rank: int | None = None) -> torch.Tensor:
    """Weighted average of the A factors zero-padded to `rank` (default: largest); (rank, in)."""
    ups = validate_updates(updates)
    target = padding_rank(ups, rank, "shared A")
    p = probabilities(ups)
    A = torch.zeros(target, ups[0].shape[1], dtype=torch.float64)
    for k, u in enumerate(ups):
        A[: u.rank] += p[k] * u.A.to(torch.float64)
    return A.float()
