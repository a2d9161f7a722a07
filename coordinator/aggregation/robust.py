"""Byzantine-robust aggregation over effective updates dW_k = s_k B_k A_k.

- `effective_norm` / `clip_updates`: Frobenius norm clipping in factor space, using
  ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)) (r x r products, no dense matrix). Clipped
  updates can be fed to any strategy (fedavg, zero_pad, stack, svd_redistribute).
- `trimmed_mean` / `coordinate_median`: coordinate-wise statistics need dense per-module
  deltas (out, in) per device, so they are for modules up to `max_dense_elements`; the
  result is re-factorised to `rank` by the SVD route (best rank-r approximation), ready for
  `svd_redistribute([result], device_ranks)`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .svd import factors_from_svd
from .types import LoraUpdate, effective
from .validation import validate_rank, validate_updates

DEFAULT_MAX_DENSE = 64 * 1024 * 1024  # elements across all devices (512 MiB in float64)


def effective_norm(update: LoraUpdate) -> float:
    """||scale * B @ A||_F from the r x r Gram matrices (B^T B)(A A^T)."""
    B, A = update.B.to(torch.float64), update.A.to(torch.float64)
    sq = torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0.0)
    return abs(float(update.scale)) * math.sqrt(float(sq))


def clip_updates(updates: Sequence[LoraUpdate], max_norm: float | None = None) -> list[LoraUpdate]:
    """Scale each update's B so that ||dW_k||_F <= max_norm (others untouched).

    max_norm=None clips to the median effective norm of the updates (adaptive threshold).
    """
    if max_norm is None:
        norms = sorted(effective_norm(u) for u in validate_updates(updates))
        max_norm = norms[(len(norms) - 1) // 2] or 1.0
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"clip norm must be a finite positive number, got {max_norm!r}")
    out = []
    for u in validate_updates(updates):
        n = effective_norm(u)
        f = min(1.0, max_norm / n) if n > 0 else 1.0
        out.append(u if f == 1.0 else LoraUpdate(A=u.A, B=(u.B.to(torch.float64) * f).float(),
                                                 scale=u.scale, weight=u.weight))
    return out


def _dense_stack(updates: list[LoraUpdate], max_dense_elements: int) -> torch.Tensor:
    out, inp = updates[0].shape
    if len(updates) * out * inp > max_dense_elements:
        raise ValueError(f"coordinate-wise statistics need {len(updates)} dense {out}x{inp} deltas "
                         f"(> max_dense_elements={max_dense_elements}); use clip_updates instead or raise the limit")
    return torch.stack([effective(u) for u in updates])  # (K, out, in) float64


def _refactor(dense: torch.Tensor, rank: int, weight: float) -> LoraUpdate:
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return factors_from_svd(U, S, Vh, rank, 1.0, weight)


def trimmed_mean(updates: Sequence[LoraUpdate], rank: int, trim: int | float = 0.1,
                 max_dense_elements: int = DEFAULT_MAX_DENSE) -> LoraUpdate:
    """Coordinate-wise mean after dropping the `trim` largest and smallest values per entry.

    trim: a count (int) or a fraction of the K devices (float in [0, 0.5)). Unweighted.
    Returns the best rank-`rank` approximation of the trimmed mean, scale 1.
    """
    ups = validate_updates(updates)
    validate_rank(rank)
    K = len(ups)
    b = int(trim) if isinstance(trim, int) else int(math.floor(float(trim) * K))
    if b < 0 or 2 * b >= K:
        raise ValueError(f"trim={trim!r} drops {2 * b} of {K} updates per entry; need 0 <= 2*trim < K")
    D = _dense_stack(ups, max_dense_elements)
    sorted_d = torch.sort(D, dim=0).values
    mean = sorted_d[b:K - b].mean(dim=0)
    return _refactor(mean, rank, float(sum(u.weight for u in ups)))


def coordinate_median(updates: Sequence[LoraUpdate], rank: int,
                      max_dense_elements: int = DEFAULT_MAX_DENSE) -> LoraUpdate:
    """Coordinate-wise median (mean of the two middle values for even K), rank-`rank` factors."""
    ups = validate_updates(updates)
    validate_rank(rank)
    K = len(ups)
    sorted_d = torch.sort(_dense_stack(ups, max_dense_elements), dim=0).values
    med = sorted_d[(K - 1) // 2] if K % 2 else 0.5 * (sorted_d[K // 2 - 1] + sorted_d[K // 2])
    return _refactor(med, rank, float(sum(u.weight for u in ups)))
