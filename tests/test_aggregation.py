"""Exactness of the factor strategies against dense float64 reference maths."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregation import (LoraUpdate, effective, factor_svd, fedavg, fedsa, lora_scale, stack,
                                     svd_redistribute, to_scale, truncate, zero_pad)

torch.set_num_threads(1)
OUT, IN = 48, 40
RANKS = [2, 4, 8, 16]
TOL = 1e-5


def make(rank: int, seed: int, alpha: float = 16.0, rslora: bool = False, weight: float = 1.0,
         out: int = OUT, inp: int = IN) -> LoraUpdate:
    g = torch.Generator().manual_seed(seed)
    return LoraUpdate(A=torch.randn(rank, inp, generator=g), B=torch.randn(out, rank, generator=g),
                      scale=lora_scale(alpha, rank, rslora), weight=weight)


def hetero(rslora: bool = False) -> list[LoraUpdate]:
    return [make(r, 10 + i, alpha=8.0 * (i + 1), rslora=rslora, weight=float(3 + 2 * i)) for i, r in enumerate(RANKS)]


def dense_sum(ups: list[LoraUpdate]) -> torch.Tensor:
    w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
    p = w / w.sum()
    return sum(p[k] * effective(u) for k, u in enumerate(ups))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(torch.float64) - ref).norm() / ref.norm())


def test_scale_conventions():
    assert lora_scale(16, 4) == 4.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0


@pytest.mark.parametrize("rslora", [False, True])
def test_stack_is_exact(rslora):
    ups = hetero(rslora)
    out = stack(ups)
    assert out.A.shape == (sum(RANKS), IN) and out.B.shape == (OUT, sum(RANKS)) and out.scale == 1.0
    assert out.A.dtype == torch.float32
    assert rel(effective(out), dense_sum(ups)) < TOL
    assert out.weight == sum(u.weight for u in ups)


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_redistribute_matches_dense_truncation(rslora):
    ups = hetero(rslora)
    ref = dense_sum(ups)
    U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
    outs = svd_redistribute(ups, RANKS + [sum(RANKS)])
    for r, o in zip(RANKS + [sum(RANKS)], outs):
        assert o.A.shape == (r, IN) and o.B.shape == (OUT, r) and o.scale == 1.0
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        assert rel(effective(o), best) < TOL, r
        # Eckart-Young: error equals the discarded singular values
        err = float((effective(o) - ref).norm())
        assert math.isclose(err, float(S[r:].pow(2).sum().sqrt()), rel_tol=1e-4, abs_tol=1e-4 * float(S[0]))
        # balanced split: both factors carry sqrt(S)
        assert torch.allclose(o.A.norm(dim=1), o.B.norm(dim=0), rtol=1e-4)
    # full rank reproduces the sum exactly
    assert rel(effective(outs[-1]), ref) < TOL


def test_svd_redistribute_requested_scales_and_padding():
    ups = [make(2, 1), make(3, 2)]
    ref = dense_sum(ups)
    scales = [lora_scale(16, 8), lora_scale(16, 8, True)]
    outs = svd_redistribute(ups, [8, 8], scales=scales)
    for o, s in zip(outs, scales):
        assert o.scale == s and o.A.shape == (8, IN)
        assert rel(effective(o), ref) < TOL  # total rank 5 <= 8: exact, zero-padded
        assert torch.count_nonzero(o.A[5:]) == 0 and torch.count_nonzero(o.B[:, 5:]) == 0


def test_factor_svd_wide_and_tall_cases():
    # R larger than min(out, in): QR is reduced, result still exact
    B, A = torch.randn(6, 30, dtype=torch.float64), torch.randn(30, 9, dtype=torch.float64)
    U, S, Vh = factor_svd(B, A)
    assert U.shape == (6, 6) and Vh.shape == (6, 9)
    assert torch.allclose((U * S) @ Vh, B @ A, atol=1e-10)


@pytest.mark.parametrize("rslora", [False, True])
def test_zero_pad_matches_padded_average(rslora):
    ups = hetero(rslora)
    out = zero_pad(ups, 16)
    assert out.A.shape == (16, IN) and out.B.shape == (OUT, 16) and out.scale == 1.0  # scales differ: folded
    w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
    p = w / w.sum()
    A_ref = torch.zeros(16, IN, dtype=torch.float64)
    B_ref = torch.zeros(OUT, 16, dtype=torch.float64)
    for k, u in enumerate(ups):
        A_ref[: u.rank] += p[k] * u.A.double()
        B_ref[:, : u.rank] += p[k] * u.scale * u.B.double()
    assert rel(out.A, A_ref) < TOL and rel(out.B, B_ref) < TOL
    assert rel(effective(out), B_ref @ A_ref) < TOL
    # device download: its slice at its own scale
    for r in RANKS:
        s = lora_scale(16, r, rslora)
        d = to_scale(truncate(out, r), s)
        assert d.A.shape == (r, IN) and d.B.shape == (OUT, r) and d.scale == s
        assert rel(effective(d), B_ref[:, :r] @ A_ref[:r]) < TOL


def test_zero_pad_equal_scales_keeps_scale_and_pads_to_max():
    ups = [make(4, 1, alpha=8, rslora=True), make(4, 2, alpha=8, rslora=True)]
    out = zero_pad(ups)
    assert out.scale == lora_scale(8, 4, True) and out.rank == 4
    with pytest.raises(ValueError, match="update 1: rank 4 exceeds"):
        zero_pad([make(2, 1), make(4, 2)], 3)


def test_fedavg_same_scale_and_folded_scale():
    ups = [make(4, i, alpha=16, weight=1.0 + i) for i in range(3)]
    out = fedavg(ups)
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6
    A_ref = sum(p[k] * u.A.double() for k, u in enumerate(ups))
    B_ref = sum(p[k] * u.B.double() for k, u in enumerate(ups))
    assert out.scale == 4.0 and rel(out.A, A_ref) < TOL and rel(out.B, B_ref) < TOL
    # different alphas (same rank): scale folded into B, result scale 1
    mixed = [make(4, 0, alpha=4), make(4, 1, alpha=32, rslora=True)]
    out = fedavg(mixed)
    B_ref = 0.5 * (mixed[0].scale * mixed[0].B.double() + mixed[1].scale * mixed[1].B.double())
    assert out.scale == 1.0 and rel(out.B, B_ref) < TOL
    with pytest.raises(ValueError, match="update 1: rank 8 differs"):
        fedavg([make(4, 0), make(8, 1)])


def test_fedavg_of_identical_updates_is_identity():
    u = make(8, 3)
    out = fedavg([u, u, u])
    assert rel(effective(out), effective(u)) < TOL


def test_fedsa_averages_only_a():
    ups = hetero()
    A = fedsa(ups, 16)
    w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
    p = w / w.sum()
    A_ref = torch.zeros(16, IN, dtype=torch.float64)
    for k, u in enumerate(ups):
        A_ref[: u.rank] += p[k] * u.A.double()
    assert A.shape == (16, IN) and rel(A, A_ref) < TOL


def test_to_scale_and_truncate_preserve_meaning():
    u = make(8, 5, alpha=16)
    v = to_scale(u, 0.37)
    assert v.scale == 0.37 and rel(effective(v), effective(u)) < TOL
    t = truncate(u, 3)
    assert torch.equal(t.A, u.A[:3]) and torch.equal(t.B, u.B[:, :3])
    p = truncate(u, 12)
    assert p.A.shape == (12, IN) and rel(effective(p), effective(u)) < TOL


def bad_cases():
    good = make(4, 0)
    nan_a = good.A.clone()
    nan_a[0, 0] = float("nan")
    return [
        ([], "empty"),
        ([good, LoraUpdate(A=torch.randn(4, IN + 1), B=torch.randn(OUT, 4), scale=1.0)], "update 1: effective shape"),
        ([good, LoraUpdate(A=torch.randn(4, IN), B=torch.randn(OUT, 3), scale=1.0)], "update 1: A/B rank mismatch"),
        ([good, good, LoraUpdate(A=nan_a, B=good.B, scale=1.0)], "update 2: A contains non-finite"),
        ([LoraUpdate(A=torch.randn(0, IN), B=torch.randn(OUT, 0), scale=1.0)], "update 0: rank must be >= 1"),
        ([good, LoraUpdate(A=good.A, B=good.B, scale=1.0, weight=0.0)], "update 1: weight must be"),
        ([good, LoraUpdate(A=good.A, B=good.B, scale=float("inf"))], "update 1: scale must be"),
        ([good, "not an update"], "update 1 is a str"),
    ]


@pytest.mark.parametrize("fn", [fedavg, zero_pad, stack, lambda u: svd_redistribute(u, [2]), fedsa])
def test_bad_input_names_the_update(fn):
    for ups, msg in bad_cases():
        with pytest.raises(ValueError, match=msg):
            fn(ups)


def test_bad_requested_ranks():
    with pytest.raises(ValueError, match="requested rank 1"):
        svd_redistribute([make(4, 0)], [4, 0])
    with pytest.raises(ValueError, match="rank must be"):
        zero_pad([make(4, 0)], 0)


def test_bench_routes_agree_in_process(tmp_path):
    """tools/bench_aggregation.py: both routes' workers on a tiny case agree (smoke test)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_aggregation.py"
    spec = importlib.util.spec_from_file_location("bench_aggregation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ranks = [3, 5, 8, 4]
    saved = {}
    for route in ("factor", "dense"):
        spec_ = {"route": route, "out": 40, "in": 56, "ranks": ranks, "seed": 1, "threads": 1,
                 "save": str(tmp_path / f"{route}.pt")}
        res = bench.worker(spec_)
        assert res["seconds"] > 0 and res["peak_extra_bytes"] >= 0
        saved[route] = torch.load(spec_["save"])
    torch.set_num_threads(1)
    assert set(saved["factor"]) == {3, 5, 8}
    assert bench.rel_error(saved["factor"], saved["dense"]) < 1e-5
    # the error measure is not blind: a different rank-3 answer is far off
    wrong = {r: (saved["factor"][r][0] * 1.5, saved["factor"][r][1]) for r in saved["factor"]}
    assert bench.rel_error(wrong, saved["dense"]) > 0.4


def test_bad_requested_scales():
    with pytest.raises(ValueError, match="requested scale 0"):
        svd_redistribute([make(4, 0)], [4], scales=[-1.0])
    with pytest.raises(ValueError, match="one scale per rank"):
        svd_redistribute([make(4, 0)], [4, 2], scales=[1.0])


@pytest.mark.parametrize("case", ["duplicate devices", "zero-padded columns", "collinear", "all zero"])
def test_svd_redistribute_degenerate_stacks(case):
    """Rank-deficient stacks take the Householder QR fallback and stay exact."""
    u = make(4, 1)
    if case == "duplicate devices":
        ups = [u, u, make(2, 2)]
    elif case == "zero-padded columns":
        padded = truncate(u, 8)  # 4 zero columns in B, zero rows in A
        ups = [padded, make(4, 3)]
    elif case == "collinear":
        B = u.B.clone()
        B[:, 1] = B[:, 0] * (1 + 1e-9)
        ups = [LoraUpdate(A=u.A, B=B, scale=u.scale), make(2, 4)]
    else:
        ups = [LoraUpdate(A=torch.zeros(4, IN), B=torch.zeros(OUT, 4), scale=1.0)]
    ref = dense_sum(ups)
    out = svd_redistribute(ups, [2, 16])
    if case == "all zero":
        assert torch.count_nonzero(out[1].A) == 0 and out[1].A.shape == (16, IN)
        return
    U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
    assert rel(effective(out[0]), (U[:, :2] * S[:2]) @ Vh[:2]) < TOL
    assert rel(effective(out[1]), ref) < TOL


def test_factor_svd_gram_and_qr_routes_agree():
    from coordinator.aggregation import svd as svd_mod
    ups = hetero(True)
    Bs, As = svd_mod.stacked_factors(ups)
    U1, S1, V1 = factor_svd(Bs, As, k=6)
    old = svd_mod.CHOLESKY_MIN_PIVOT
    try:
        svd_mod.CHOLESKY_MIN_PIVOT = 2.0  # force the QR route
        U2, S2, V2 = factor_svd(Bs, As, k=6)
    finally:
        svd_mod.CHOLESKY_MIN_PIVOT = old
    assert torch.allclose(S1, S2, rtol=1e-9)
    assert torch.allclose((U1 * S1) @ V1, (U2 * S2) @ V2, atol=1e-9 * float(S1[0]))
    assert torch.allclose(U1.T @ U1, torch.eye(6, dtype=torch.float64), atol=1e-9)
