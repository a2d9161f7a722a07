"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) with an RDP accountant.

Each device's whole update (all its modules jointly) is clipped to Frobenius norm C in
factor space, the clipped effective updates are summed per module, Gaussian noise
N(0, (sigma C)^2) is added to every entry of each dense sum, and the sum is divided by the
expected number of participants. The noisy mean is re-factorised to the requested rank by
the SVD route (post-processing keeps the guarantee).

Accounting: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), as in
tf-privacy / opacus, at integer and fractional orders; conversion to (eps, delta) with the
tighter bound of Balle et al. 2020 (also used by opacus).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .robust import effective_norm
from .types import LoraUpdate, effective
from .validation import validate_rank, validate_updates

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256])


@dataclass(frozen=True)
class DPConfig:
    """clip_norm C, noise_multiplier sigma (noise std = sigma C), sample_rate q, target delta."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class DPResult:
    modules: dict[str, LoraUpdate]  # noisy mean per module, rank-`rank` factors, scale 1
    clip_factors: list[float]  # per device, 1.0 = not clipped
    noise_std: float  # per entry of the noisy sum


def dp_aggregate(devices: Sequence[Mapping[str, LoraUpdate]], config: DPConfig, rank: int,
                 generator: torch.Generator, expected_clients: float | None = None) -> DPResult:
    """Clip each device's update jointly over its modules, sum, add noise, mean, re-factorise.

    devices[k]: module key -> LoraUpdate (weights are ignored: DP-FedAvg is unweighted).
    expected_clients: the denominator (q * population for Poisson sampling); default len(devices).
    """
    validate_rank(rank)
    if not devices:
        raise ValueError("no device updates for DP aggregation: the list is empty")
    names = sorted(devices[0])
    for i, d in enumerate(devices):
        if sorted(d) != names:
            raise ValueError(f"device {i}: modules differ from device 0's")
    factors = []
    for i, d in enumerate(devices):
        try:
            total = math.sqrt(sum(effective_norm(u) ** 2 for u in validate_updates(list(d.values()))))
        except ValueError as e:
            raise ValueError(f"device {i}: {e}") from e
        factors.append(min(1.0, config.clip_norm / total) if total > 0 else 1.0)
    denom = float(expected_clients) if expected_clients is not None else float(len(devices))
    if not denom > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    std = config.noise_multiplier * config.clip_norm
    out: dict[str, LoraUpdate] = {}
    for name in names:
        ups = validate_updates([d[name] for d in devices])
        total_dw = sum(f * effective(u) for f, u in zip(factors, ups))  # (out, in) float64
        noise = torch.randn(total_dw.shape, generator=generator, dtype=torch.float64) * std
        mean = (total_dw + noise) / denom
        U, S, Vh = torch.linalg.svd(mean, full_matrices=False)
        k = min(rank, S.shape[0])
        root = S[:k].sqrt()
        B = torch.zeros(mean.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, mean.shape[1], dtype=torch.float64)
        B[:, :k], A[:k] = U[:, :k] * root, root[:, None] * Vh[:k]
        out[name] = LoraUpdate(A=A.float(), B=B.float(), scale=1.0, weight=float(len(devices)))
    return DPResult(modules=out, clip_factors=factors, noise_std=std)


# ---------------------------------------------------------------- RDP accountant

def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    return a + math.log1p(-math.exp(b - a)) if a > b else -math.inf


def _log_erfc(x: float) -> float:
    r = math.erfc(x)
    if r > 0.0:
        return math.log(r)
    # asymptotic expansion for large x
    return (-math.log(math.pi) / 2 - math.log(x) - x ** 2 - 0.5 * x ** -2 + 0.625 * x ** -4
            - 37.0 / 24.0 * x ** -6 + 353.0 / 64.0 * x ** -8)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = (math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
                    + i * math.log(q) + (alpha - i) * math.log(1 - q))
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma ** 2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    i, coef = 0, 1.0  # coef = binom(alpha, i), built iteratively (may be negative)
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma ** 2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma ** 2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
        coef *= (alpha - (i - 1)) / i
    return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(q: float, sigma: float, order: float) -> float:
    """RDP of one step of the Poisson-sampled Gaussian mechanism at `order` (alpha > 1)."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return order / (2 * sigma ** 2)
    if math.isinf(sigma ** 2):
        return 0.0
    log_a = _log_a_int(q, sigma, int(order)) if float(order).is_integer() else _log_a_frac(q, sigma, order)
    return log_a / (order - 1)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(eps, best order) from RDP values (Balle et al. 2020 conversion)."""
    best = (math.inf, math.nan)
    for r, a in zip(rdp, orders):
        if a <= 1 or math.isinf(r):
            continue
        eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        if eps < best[0]:
            best = (max(eps, 0.0), float(a))
    return best


@dataclass
class RDPAccountant:
    """Composes rounds of the sampled Gaussian mechanism; `epsilon(delta)` after each."""

    orders: tuple[float, ...] = DEFAULT_ORDERS
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q, steps)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def rdp(self) -> list[float]:
        return [sum(n * rdp_sampled_gaussian(q, s, a) for s, q, n in self.history) for a in self.orders]

    def epsilon(self, delta: float) -> float:
        if not self.history:
            return 0.0
        return rdp_to_epsilon(self.rdp(), self.orders, delta)[0]


def epsilon_per_round(config: DPConfig, rounds: int) -> list[float]:
    """Cumulative eps after each of `rounds` rounds (one sampled Gaussian release each) at config.delta."""
    orders = DEFAULT_ORDERS
    one = [rdp_sampled_gaussian(config.sample_rate, config.noise_multiplier, a) for a in orders]
    return [rdp_to_epsilon([t * r for r in one], orders, config.delta)[0] for t in range(1, rounds + 1)]
