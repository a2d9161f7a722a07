"""Input checks shared by every strategy; errors name the offending update index."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .types import LoraUpdate


def validate_updates(updates: Sequence[LoraUpdate], *, same_rank: bool = False) -> list[LoraUpdate]:
    """Check a non-empty list of updates with matching (out, in); returns it as a list.

    Raises ValueError naming the offending update index for: empty list, wrong type,
    non-2D factors, A/B rank mismatch, rank < 1, shape mismatch with update 0, non-finite
    values or scale, non-positive weight, and (if same_rank) differing ranks.
    """
    ups = list(updates) if updates is not None else []
    if not ups:
        raise ValueError("no updates to aggregate: the list is empty")
    ref_shape: tuple[int, int] | None = None
    ref_rank: int | None = None
    for i, u in enumerate(ups):
        if not isinstance(u, LoraUpdate):
            raise ValueError(f"update {i} is a {type(u).__name__}, expected LoraUpdate")
        for name, t in (("A", u.A), ("B", u.B)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"update {i}: {name} must be a 2-D tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if not t.is_floating_point():
                raise ValueError(f"update {i}: {name} must be floating point, got {t.dtype}")
        r = int(u.A.shape[0])
        if r < 1:
            raise ValueError(f"update {i}: rank must be >= 1, A has shape {tuple(u.A.shape)}")
        if int(u.B.shape[1]) != r:
            raise ValueError(f"update {i}: A/B rank mismatch, A {tuple(u.A.shape)} is (r, in) but "
                             f"B {tuple(u.B.shape)} is not (out, r)")
        shape = (int(u.B.shape[0]), int(u.A.shape[1]))
        if ref_shape is None:
            ref_shape, ref_rank = shape, r
        elif shape != ref_shape:
            raise ValueError(f"update {i}: effective shape (out, in)={shape} differs from update 0's {ref_shape}")
        if same_rank and r != ref_rank:
            raise ValueError(f"update {i}: rank {r} differs from update 0's rank {ref_rank}; "
                             "this strategy needs equal ranks (use zero_pad, stack or svd_redistribute)")
        if not (isinstance(u.scale, (int, float)) and math.isfinite(u.scale) and u.scale != 0):
            raise ValueError(f"update {i}: scale must be a finite non-zero number, got {u.scale!r}")
        if not (isinstance(u.weight, (int, float)) and math.isfinite(u.weight) and u.weight > 0):
            raise ValueError(f"update {i}: weight must be a finite positive number, got {u.weight!r}")
        for name, t in (("A", u.A), ("B", u.B)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"update {i}: {name} contains non-finite values (nan/inf)")
    return ups


def validate_rank(rank: int, what: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {rank!r}")
    return rank


def probabilities(updates: Sequence[LoraUpdate]) -> torch.Tensor:
    """p_k = w_k / sum w, float64 of shape (K,)."""
    w = torch.tensor([float(u.weight) for u in updates], dtype=torch.float64)
    return w / w.sum()


def common_scale(updates: Sequence[LoraUpdate]) -> float | None:
    """The shared scale if every update has the same one, else None."""
    s0 = float(updates[0].scale)
    return s0 if all(float(u.scale) == s0 for u in updates) else None


def padding_rank(ups: Sequence[LoraUpdate], rank: int | None, what: str) -> int:
    """The rank updates are zero-padded to (default: the largest); raises if one exceeds it."""
    target = max(u.rank for u in ups) if rank is None else validate_rank(rank)
    for i, u in enumerate(ups):
        if u.rank > target:
            raise ValueError(f"update {i}: rank {u.rank} exceeds the {what} rank {target}")
    return target
