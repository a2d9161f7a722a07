"""HetLoRA zero-padding: pad every update to a common rank, then average A and B.

Global state between rounds: the factors stay at the largest rank; a device of rank r
downloads `truncate(global, r)` (rows [:r] of A, columns [:, :r] of B) converted to its own
scale with `to_scale`. Scales are folded into B as in `fedavg` (kept when all equal,
otherwise B_k <- s_k B_k and the result has scale 1.0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LoraUpdate, pad
from .validation import common_scale, padding_rank, probabilities, validate_updates


def zero_pad(updates: Sequence[LoraUpdate], rank: int | None = None) -> LoraUpdate:
    """Weighted average of updates zero-padded to `rank` (default: the largest rank).

    Returns A (rank, in), B (out, rank).
    """
    ups = validate_updates(updates)
    target = padding_rank(ups, rank, "zero-padding")
    p = probabilities(ups)
    s = common_scale(ups)
    fold = s is None
    out, inp = ups[0].shape
    A = torch.zeros(target, inp, dtype=torch.float64)
    B = torch.zeros(out, target, dtype=torch.float64)
    for k, u in enumerate(ups):
        padded = pad(LoraUpdate(A=u.A.to(torch.float64), B=u.B.to(torch.float64), scale=u.scale), target)
        A += p[k] * padded.A
        B += p[k] * (u.scale if fold else 1.0) * padded.B
    return LoraUpdate(A=A.float(), B=B.float(), scale=1.0 if fold else s,
                      weight=float(sum(u.weight for u in ups)))
