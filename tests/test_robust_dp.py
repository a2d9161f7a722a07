"""Robust aggregation (clipping, trimmed mean, median) and client-level DP with RDP accounting."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregation import (DPConfig, LoraUpdate, RDPAccountant, clip_updates, coordinate_median,
                                     dp_aggregate, effective, effective_norm, epsilon_per_round, lora_scale,
                                     stack, svd_redistribute, trimmed_mean)
from coordinator.aggregation.dp import rdp_sampled_gaussian

torch.set_num_threads(1)
OUT, IN = 32, 24
RANKS = [2, 4, 8, 16, 4, 8, 2, 16, 8, 4]


def from_dense(M: torch.Tensor, rank: int, alpha: float, rslora: bool, weight: float = 1.0) -> LoraUpdate:
    """Factors at a device's rank/scale whose effective update is the best rank-r approx of M."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    s = lora_scale(alpha, rank, rslora)
    root = (S[:rank] / s).sqrt()
    return LoraUpdate(A=(root[:, None] * Vh[:rank]).float(), B=(U[:, :rank] * root).float(), scale=s, weight=weight)


@pytest.fixture(scope="module")
def honest():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(OUT, 2, generator=g, dtype=torch.float64) @ torch.randn(2, IN, generator=g, dtype=torch.float64)
    ups = [from_dense(signal + 0.05 * torch.randn(OUT, IN, generator=g, dtype=torch.float64), r, 16.0, i % 3 == 0)
           for i, r in enumerate(RANKS[:-1])]
    mean = sum(effective(u) for u in ups) / len(ups)
    return ups, mean


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


def test_effective_norm_matches_dense():
    u = from_dense(torch.randn(OUT, IN, dtype=torch.float64), 8, 16.0, True)
    assert math.isclose(effective_norm(u), float(effective(u).norm()), rel_tol=1e-6)


def test_clip_updates_bounds_norms():
    ups = [from_dense(torch.randn(OUT, IN, dtype=torch.float64) * (i + 1), 4, 8.0, False) for i in range(4)]
    clipped = clip_updates(ups, 5.0)
    for u, c in zip(ups, clipped):
        n = effective_norm(u)
        assert effective_norm(c) == pytest.approx(min(n, 5.0), rel=1e-5)
        if n > 5.0:  # direction unchanged
            assert rel(effective(c) * n / 5.0, effective(u)) < 1e-5


@pytest.mark.parametrize("attack,factor", [("scaled x100", 100.0), ("sign-flipped", -1.0), ("sign-flipped x100", -100.0)])
def test_malicious_device_has_bounded_effect(honest, attack, factor):
    ups, mean = honest
    victim = ups[0]
    evil = LoraUpdate(A=victim.A, B=victim.B * factor, scale=victim.scale)
    fleet = ups + [evil]
    n = len(fleet)
    plain = rel(effective(stack(fleet)), mean)
    clipped = rel(effective(stack(clip_updates(fleet))), mean)  # clip to the median norm
    trimmed = rel(effective(trimmed_mean(fleet, rank=16, trim=1)), mean)
    median = rel(effective(coordinate_median(fleet, rank=16)), mean)
    # the robust result still feeds the heterogeneous SVD redistribution
    per_device = svd_redistribute([trimmed_mean(fleet, rank=16, trim=1)], [2, 8])
    redistributed = rel(effective(per_device[0]), mean)
    print(f"\n{attack:>18} (1 of {n}): rel. error vs honest mean  plain {plain:.3f}  clip {clipped:.3f}  "
          f"trimmed {trimmed:.3f}  median {median:.3f}  trimmed->rank2 {redistributed:.3f}")
    assert clipped < 0.25 and trimmed < 0.1 and median < 0.1 and redistributed < 0.15
    if abs(factor) == 100.0:
        assert plain > 5.0  # the undefended mean is wrecked


def test_trimmed_mean_rejects_bad_trim_and_big_dense(honest):
    ups, _ = honest
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(ups, rank=4, trim=5)
    with pytest.raises(ValueError, match="max_dense_elements"):
        coordinate_median(ups, rank=4, max_dense_elements=100)


def test_dp_without_noise_is_clipped_mean(honest):
    ups, _ = honest
    devices = [{"q": u, "v": u} for u in ups]
    C = 3.0
    res = dp_aggregate(devices, DPConfig(clip_norm=C, noise_multiplier=0.0), rank=min(OUT, IN),
                       generator=torch.Generator().manual_seed(0))
    for f, u in zip(res.clip_factors, ups):  # joint norm over both modules is sqrt(2) ||dW||
        assert f * math.sqrt(2) * effective_norm(u) <= C * (1 + 1e-6)
    ref = sum(f * effective(u) for f, u in zip(res.clip_factors, ups)) / len(ups)
    assert rel(effective(res.modules["q"]), ref) < 1e-5


def test_dp_noise_has_the_configured_std():
    zero = LoraUpdate(A=torch.zeros(2, 200), B=torch.zeros(300, 2), scale=1.0)
    cfg = DPConfig(clip_norm=2.0, noise_multiplier=1.5)
    res = dp_aggregate([{"m": zero}] * 4, cfg, rank=200, generator=torch.Generator().manual_seed(1))
    empirical = float(effective(res.modules["m"]).std())
    expected = 1.5 * 2.0 / 4  # noise on the sum divided by the number of clients
    print(f"\nDP noise std per entry of the mean: expected {expected:.4f}, measured {empirical:.4f}")
    assert empirical == pytest.approx(expected, rel=0.03)


# eps at delta=1e-5 computed with opacus 1.5.4 (opacus.accountants.analysis.rdp, same orders)
OPACUS = [(0.01, 1.1, 1000, 1.7117700912203435), (0.1, 1.0, 100, 7.899255002434629),
          (1.0, 2.0, 10, 8.079406222420491), (0.005, 0.8, 5000, 3.616246707517531),
          (0.3, 1.5, 50, 8.890282097535996)]


@pytest.mark.parametrize("q,sigma,steps,eps_ref", OPACUS)
def test_rdp_accountant_matches_opacus(q, sigma, steps, eps_ref):
    acc = RDPAccountant()
    acc.step(sigma, q, steps)
    assert acc.epsilon(1e-5) == pytest.approx(eps_ref, rel=1e-6)


def test_rdp_closed_form_and_monotonicity():
    assert rdp_sampled_gaussian(1.0, 2.0, 8) == pytest.approx(8 / 8)
    eps = epsilon_per_round(DPConfig(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, delta=1e-5), 20)
    print("\neps per round (sigma=1, q=0.1, delta=1e-5):", " ".join(f"{e:.2f}" for e in eps[:5]), "...", f"{eps[-1]:.2f}")
    assert all(b > a for a, b in zip(eps, eps[1:]))
    more_noise = epsilon_per_round(DPConfig(clip_norm=1.0, noise_multiplier=2.0, sample_rate=0.1), 20)
    assert more_noise[-1] < eps[-1]
    with pytest.raises(ValueError, match="sample_rate"):
        DPConfig(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.0)
