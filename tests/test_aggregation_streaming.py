"""Streaming aggregation equals the batch functions (exactly where the maths is exact)."""
from __future__ import annotations

import pytest
import torch

from coordinator.aggregation import (LoraUpdate, StreamingAggregator, effective, fedavg, lora_scale, stack,
                                     svd_redistribute, zero_pad, zo_aggregate, zo_replay_update)
from protos.zo import apply_step

torch.set_num_threads(1)
OUT, IN = 40, 36


def make(rank, seed, alpha=16.0, rslora=False, weight=1.0):
    g = torch.Generator().manual_seed(seed)
    return LoraUpdate(A=torch.randn(rank, IN, generator=g), B=torch.randn(OUT, rank, generator=g),
                      scale=lora_scale(alpha, rank, rslora), weight=weight)


def hetero():
    return [make(r, i, alpha=4.0 * (i + 1), rslora=i % 2 == 1, weight=1.0 + i) for i, r in enumerate([2, 4, 8, 16, 4])]


def stream(kind, ups, **kw):
    agg = StreamingAggregator(kind, **kw)
    for u in ups:
        agg.add(u)
    return agg


def close(x, y, tol=1e-6):
    return float((x.double() - y.double()).norm() / y.double().norm()) < tol


def test_fedavg_streaming_equals_batch():
    for ups in ([make(4, i, weight=i + 1.0) for i in range(4)], [make(4, i, alpha=2.0 + i) for i in range(4)]):
        s, b = stream("mean", ups).result(), fedavg(ups)
        assert s.scale == b.scale and close(s.A, b.A) and close(s.B, b.B)


def test_zero_pad_streaming_equals_batch():
    ups = hetero()
    s, b = stream("padded", ups, rank=16).result(), zero_pad(ups, 16)
    assert s.scale == b.scale == 1.0 and close(s.A, b.A) and close(s.B, b.B)


def test_stack_streaming_exact_under_cap():
    ups = hetero()
    agg = stream("stacked", ups, max_rank=64)
    s, b = agg.result(), stack(ups)
    assert agg.relative_error == 0.0 and s.rank == b.rank == 34
    assert close(s.A, b.A) and close(s.B, b.B)


def test_svd_streaming_exact_under_cap_and_bounded_over_cap():
    ups = hetero()
    ranks = [2, 8, 16]
    exact = svd_redistribute(ups, ranks)
    agg = stream("stacked", ups, max_rank=64)
    for s, b in zip(agg.svd_result(ranks), exact):
        assert close(effective(s), effective(b), 1e-5)
    # recompression: cap 16 < total rank 34
    capped = stream("stacked", ups, max_rank=16)
    full = stream("stacked", ups, max_rank=64).result()
    approx = capped.svd_result([16])[0]
    true_err = float((effective(approx) - effective(full)).norm() / effective(full).norm())
    print(f"\nstreaming svd cap 16: reported bound {capped.relative_error:.4f}, true rel. error {true_err:.4f}")
    assert 0 < capped.relative_error and true_err <= capped.relative_error * (1 + 1e-6)
    assert capped.current_rank == 16


def test_streaming_rejects_bad_input_with_index():
    agg = StreamingAggregator("mean")
    agg.add(make(4, 0))
    with pytest.raises(ValueError, match="update 1: rank 8"):
        agg.add(make(8, 1))
    bad = make(4, 2)
    bad.B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="update 1: B contains non-finite"):
        agg.add(bad)
    with pytest.raises(ValueError, match="needs the target rank"):
        StreamingAggregator("padded")
    with pytest.raises(ValueError, match="nothing to aggregate"):
        StreamingAggregator("stacked").result()


def test_zo_replay_reproduces_device_and_aggregates():
    shapes = {"lora_A": (4, IN), "lora_B": (OUT, 4)}
    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    finals, uploads = [], []
    for d in range(3):
        pairs = [(1000 * d + t, float(torch.randn(1, generator=g))) for t in range(5)]
        device = {k: v.clone() for k, v in start.items()}
        for seed, grad in pairs:  # what the device does locally
            apply_step(device, seed, grad, 1e-2)
        replayed = zo_replay_update(start, pairs, 1e-2)
        assert all(torch.equal(replayed[k], device[k]) for k in shapes)  # bit for bit
        finals.append(device)
        uploads.append((pairs, 1e-2))
    agg = zo_aggregate([start] * 3, uploads, weights=[1.0, 2.0, 3.0])
    for k in shapes:
        ref = sum(w / 6.0 * f[k].double() for w, f in zip([1.0, 2.0, 3.0], finals))
        assert torch.allclose(agg[k].double(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="device 1: .*non-finite"):
        zo_aggregate([start] * 2, [([(1, 0.5)], 1e-2), ([(2, float("nan"))], 1e-2)])
