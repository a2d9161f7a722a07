"""Zeroth-order (MeZO / FedKSeed) local training: two forwards per step, no backward, no optimizer.

Per step: draw a seed from the finite pool (`protos.zo.seed_pool`), z = perturbation(seed),
L+ = loss(theta + eps z), L- = loss(theta - eps z), g = (L+ - L-) / (2 eps); then restore theta
from a clean copy and apply `protos.zo.apply_step(theta, seed, g, lr)`. Because the update uses
exactly the arithmetic of `protos.zo.replay`, replaying the recorded (seed, g) pairs from the
starting parameters reproduces the device's final parameters bit for bit (float32, CPU).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from protos import zo as zo_wire


@dataclass
class ZOState:
    """Seed pool and the per-step seed sampler for one local run."""

    pool: list[int]
    rng: torch.Generator
    pairs: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def create(cls, pool_seed: int, pool_size: int, seed: int) -> "ZOState":
        return cls(zo_wire.seed_pool(pool_seed, pool_size), torch.Generator().manual_seed(int(seed)))

    def next_seed(self) -> int:
        return self.pool[int(torch.randint(len(self.pool), (1,), generator=self.rng))]


def _check_params(params: Mapping[str, torch.Tensor]) -> None:
    if not params:
        raise ValueError("zeroth-order training has no trainable parameters to perturb")
    for k, p in params.items():
        if p.dtype != torch.float32:
            raise ValueError(f"zeroth-order parameter {k} is {p.dtype}; ZO needs float32 trainable "
                             "parameters for exact replay")


@torch.no_grad()
def zo_step(params: Mapping[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor], seed: int, eps: float,
            lr: float) -> tuple[float, float, float]:
    """One MeZO step in place on `params` (name -> float32 tensor). Returns (g, L+, L-)."""
    clean = {k: p.detach().clone() for k, p in params.items()}
    z = zo_wire.perturbation(seed, {k: tuple(p.shape) for k, p in params.items()})
    for k, p in params.items():
        p.copy_(clean[k]).add_(z[k].to(p.device), alpha=eps)
    loss_plus = float(loss_fn())
    for k, p in params.items():
        p.copy_(clean[k]).add_(z[k].to(p.device), alpha=-eps)
    loss_minus = float(loss_fn())
    g = (loss_plus - loss_minus) / (2.0 * eps)
    if not torch.isfinite(torch.tensor(g)):
        for k, p in params.items():
            p.copy_(clean[k])
        raise ValueError(f"zeroth-order step produced a non-finite gradient estimate (L+={loss_plus}, "
                         f"L-={loss_minus}); lower zo_eps or the learning rate")
    for k, p in params.items():
        p.copy_(clean[k])
    zo_wire.apply_step(params, seed, g, lr)
    return g, loss_plus, loss_minus


def zo_train(params: Mapping[str, torch.Tensor], loss_on: Callable[[object], torch.Tensor], batches: Iterator[object],
             steps: int, lr: float, eps: float, state: ZOState,
             on_step: Callable[[int, float], None] | None = None) -> tuple[list[tuple[int, float]], list[float]]:
    """Run `steps` ZO steps; returns ((seed, g) pairs, mean loss (L+ + L-)/2 per step)."""
    _check_params(params)
    losses: list[float] = []
    for step in range(steps):
        batch = next(batches)
        seed = state.next_seed()
        g, lp, lm = zo_step(params, lambda: loss_on(batch), seed, eps, lr)
        state.pairs.append((seed, g))
        losses.append(0.5 * (lp + lm))
        if on_step is not None:
            on_step(step, losses[-1])
    return state.pairs, losses
