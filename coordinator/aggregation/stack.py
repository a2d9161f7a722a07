"""FLoRA stacking: concatenate factors so the product is exactly the weighted sum.

A = cat_k A_k along rows (R, in), B = cat_k p_k s_k B_k along columns (out, R), scale 1,
with R = sum_k r_k, so B @ A == sum_k p_k s_k B_k A_k exactly (up to float rounding).

Global state between rounds: the stacked product is merged into every device's base
weights (W <- W + B @ A) and each device starts a fresh adapter at its own rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import LoraUpdate
from .validation import probabilities, validate_updates


def stack(updates: Sequence[LoraUpdate]) -> LoraUpdate:
    """Returns A (sum r_k, in), B (out, sum r_k), scale 1.0."""
    ups = validate_updates(updates)
    p = probabilities(ups)
    A = torch.cat([u.A.to(torch.float32) for u in ups], dim=0)
    B = torch.cat([(p[k] * u.scale * u.B.to(torch.float64)).float() for k, u in enumerate(ups)], dim=1)
    return LoraUpdate(A=A, B=B, scale=1.0, weight=float(sum(u.weight for u in ups)))
