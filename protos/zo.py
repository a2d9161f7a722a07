"""Zeroth-order (MeZO / FedKSeed) wire contract shared by device and coordinator.

A ZO update is a list of (seed, projected_gradient) pairs plus the learning rate. The
perturbation z for a seed is drawn from a CPU torch.Generator over the parameter names in
sorted order, so both sides regenerate identical tensors. The device applies each step as
`p.add_(z, alpha=-lr * g)` in float32 on a clean copy of the parameters (never by undoing
perturbations arithmetically), so `replay` reproduces its result bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Shapes = Mapping[str, Sequence[int]]


def seed_pool(pool_seed: int, size: int) -> list[int]:
    """FedKSeed's finite candidate pool: `size` distinct 31-bit seeds derived from `pool_seed`."""
    if size < 1:
        raise ValueError(f"seed pool size must be >= 1, got {size}")
    g = torch.Generator(device="cpu").manual_seed(int(pool_seed))
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < size:  # rejection of duplicates keeps the pool distinct
        for s in torch.randint(0, 2**31 - 1, (size - len(out) + 8,), generator=g).tolist():
            if s not in seen and len(out) < size:
                seen.add(s)
                out.append(int(s))
    return out


def perturbation(seed: int, shapes: Shapes) -> dict[str, torch.Tensor]:
    """z ~ N(0, I) for every named parameter (float32, CPU), deterministic in `seed`."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return {name: torch.randn(tuple(int(d) for d in shapes[name]), generator=g, dtype=torch.float32)
            for name in sorted(shapes)}


def as_f32(x: float) -> float:
    """Round a Python float to the nearest float32 (the wire carries float32 scalars)."""
    return float(np.float32(x))


def apply_step(params: Mapping[str, torch.Tensor], seed: int, grad: float, lr: float) -> None:
    """In place: p <- p - lr * grad * z(seed) for every parameter (float32).

    `grad` and `lr` are rounded to float32 first, exactly as they travel on the wire, so the
    device's own update and the coordinator's replay use identical scalars."""
    z = perturbation(seed, {k: tuple(v.shape) for k, v in params.items()})
    alpha = -as_f32(as_f32(lr) * as_f32(grad))
    for name, p in params.items():
        p.add_(z[name].to(p.device), alpha=alpha)


def replay(params: Mapping[str, torch.Tensor], pairs: Sequence[tuple[int, float]], lr: float) -> dict[str, torch.Tensor]:
    """Parameters after the device's ZO steps, from the starting parameters and its (seed, g) pairs.

    params: name -> float32 tensor (any shape); returns new tensors, inputs untouched.
    """
    out = {k: v.detach().to(torch.float32).clone() for k, v in params.items()}
    for i, (seed, grad) in enumerate(pairs):
        if not torch.isfinite(torch.tensor(float(grad))):
            raise ValueError(f"zeroth-order pair {i} has a non-finite projected gradient {grad!r}")
        apply_step(out, int(seed), float(grad), lr)
    return out
