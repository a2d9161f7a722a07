"""Zeroth-order local training: the coordinator's replay reproduces the device bit for bit."""
import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_bert, make_tiny_llama
from edge_runtime.training.zo import ZOState, zo_step
from protos import zo as zo_wire

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def recs():
    return load_sst2("train", limit=128)


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_zo_replay_is_bit_exact(tmp_path, recs, kind):
    if kind == "classification":
        src, targets = make_tiny_bert(tmp_path / "m"), ["query", "value"]
    else:
        src, targets = make_tiny_llama(tmp_path / "m"), ["q_proj", "v_proj"]
    plan = Plan(mode="zo", rank=4, target_modules=targets, batch_size=8, learning_rate=1e-3, zo_eps=1e-3,
                zo_seed_pool=64)
    t = LocalTrainer(src, plan, kind, seed=3)
    start = t.adapter_state()
    r = t.train(recs, steps=12, lr=5e-3, seed=11, progress=False)
    end = t.adapter_state()
    assert r.zo_lr == 5e-3 and len(r.zo_pairs) == 12 and r.steps == 12
    pool = set(zo_wire.seed_pool(0, 64))
    assert all(s in pool for s, _ in r.zo_pairs) and any(g != 0.0 for _, g in r.zo_pairs)
    replayed = zo_wire.replay(start, r.zo_pairs, r.zo_lr)
    assert set(replayed) == set(end)
    for k in end:
        assert torch.equal(replayed[k], end[k]), k
    assert any(not torch.equal(start[k], end[k]) for k in end)
    # the same seed gives the same pairs on a fresh device
    t2 = LocalTrainer(src, plan, kind, seed=3)
    assert t2.train(recs, steps=12, lr=5e-3, seed=11, progress=False).zo_pairs == r.zo_pairs


def test_zo_step_estimates_directional_derivative():
    # loss(p) = sum(p^2): g should approximate 2 <p, z>, and the params are restored before the update
    p = {"w": torch.randn(5, 3, generator=torch.Generator().manual_seed(0))}
    start = p["w"].clone()
    seed = 1234
    z = zo_wire.perturbation(seed, {"w": (5, 3)})["w"]
    g, lp, lm = zo_step(p, lambda: (p["w"] ** 2).sum(), seed, eps=1e-3, lr=0.1)
    assert g == pytest.approx(float(2 * (start * z).sum()), rel=1e-2)
    expect = zo_wire.replay({"w": start}, [(seed, g)], 0.1)["w"]
    assert torch.equal(p["w"], expect)


def test_zo_state_draws_from_pool_reproducibly():
    a, b = ZOState.create(5, 16, seed=2), ZOState.create(5, 16, seed=2)
    sa = [a.next_seed() for _ in range(20)]
    assert sa == [b.next_seed() for _ in range(20)] and set(sa) <= set(a.pool)


def test_zo_rejects_non_fp32():
    with pytest.raises(ValueError, match="float32"):
        from edge_runtime.training.zo import zo_train
        zo_train({"w": torch.zeros(2, dtype=torch.bfloat16)}, lambda b: torch.tensor(0.0), iter([0]), 1, 0.1, 1e-3,
                 ZOState.create(0, 4, 0))
