"""FedIT / FedAvg: average A and B separately (same rank on every device).

Scale convention: if every update has the same scale s, A and B are averaged as they are
and the result keeps scale s (plain FedIT). If scales differ (different alpha or rsLoRA),
each device's scale is first folded into its B (B_k <- s_k * B_k) and the result has
scale 1.0, so every device's contribution is measured in effective-update units. Use
`to_scale(result, s_device)` to express it at a device's own scale.

Note FedIT's known inexactness: mean(B) @ mean(A) != mean(B @ A) in general.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LoraUpdate
from .validation import common_scale, probabilities, validate_updates


def fedavg(updates: Sequence[LoraUpdate]) -> LoraUpdate:
    """Weighted average of A (r, in) and B (out, r) with p_k = w_k / sum w."""
    ups = validate_updates(updates, same_rank=True)
    p = probabilities(ups)
    s = common_scale(ups)
    fold = s is None
    A = sum(p[k] * u.A.to(torch.float64) for k, u in enumerate(ups))
    B = sum(p[k] * (u.scale if fold else 1.0) * u.B.to(torch.float64) for k, u in enumerate(ups))
    return LoraUpdate(A=A.float(), B=B.float(), scale=1.0 if fold else s,
                      weight=float(sum(u.weight for u in ups)))
