"""Robust aggregation and client-level DP wired into the coordinator, over real gRPC.

Five devices of ranks 2..8 upload their downloaded adapter plus a shared direction and
noise; device 4 is malicious (its change scaled x100, or sign-flipped x-20). For every
heterogeneous strategy the error of the new global against the clean round (five honest
devices, plain mean of their updates) is printed relative to the size of the clean round's
change, for the strategy's own aggregation ("plain"), the plain mean of updates ("mean"),
clipping, and clipping + trimmed mean / median: undefended it is large, defended it stays
bounded.
"""
import json
import shutil

import pytest
import torch

from coordinator.aggregation import DPConfig, epsilon_per_round
from coordinator.cli import main as coordinator_main
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from test_reliability_support import SimDevice, tiny_model

torch.set_num_threads(1)
RANKS = [2, 4, 4, 8, 8]
STRATEGIES = ["zero_pad", "svd", "stack", "fedsa", "fedavg"]
ATTACKS = {"clean": 1.0, "x100": 100.0, "flip": -20.0}
DEFENCES = {"plain": None, "mean": {}, "clip": {"clip": True},  # plain: the strategy's own aggregation
            "clip+trimmed_mean": {"clip": True, "robust": "trimmed_mean"},
            "clip+median": {"clip": True, "robust": "median"}}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """One initialised store per strategy (round 0 only), copied for every run."""
    tmp = tmp_path_factory.mktemp("robust")
    model = tiny_model(tmp)
    out = {}
    for s in STRATEGIES:
        cfg = _cfg(model, tmp / f"tpl-{s}", s)
        Coordinator(cfg).close()
        out[s] = cfg
    return tmp, out


def _cfg(model, store, strategy, **kw):
    return CoordinatorConfig(model=str(model), store=str(store), strategy=strategy, rounds=2, min_devices=5,
                             max_rank=2 if strategy == "fedavg" else 8, cap_rank=16, poll_interval_s=0.05, **kw)


def _flat_global(c: Coordinator) -> torch.Tensor:
    """Everything the global adds to the model: effective dW per module (B kept on devices: A) and the head."""
    g = c.global_state
    assert g.strategy == c.method.name
    parts = [B.double() @ A.double() for B, A in c.method.deltas(g).values()] if c.method.shares_b else \
        [u.A.double() for u in g.modules.values()]
    parts += [v.double() for _, v in sorted(g.extra.items())]
    return torch.cat([p.reshape(-1) for p in parts])


def _one_round(tmp, tpl, run: str, factor: float, rounds: int = 1, **defence) -> Coordinator:
    store = tmp / "runs" / run
    shutil.copytree(tpl.store, store)
    cfg = CoordinatorConfig(**{**tpl.__dict__, "store": str(store), **defence})
    c = Coordinator(cfg)
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    ranks = [2] * 5 if cfg.strategy == "fedavg" else RANKS
    devs = [SimDevice(f"127.0.0.1:{port}", f"dev{i}", rank=r) for i, r in enumerate(ranks)]
    try:
        for d in devs:
            d.register()
        for r in range(rounds):
            for i, d in enumerate(devs):
                t = d.wait_task()
                state = d.download_state(t)
                gen = torch.Generator().manual_seed(1000 + r)
                direction = {k: torch.randn(v.shape, generator=gen) for k, v in sorted(state.items())}
                f = factor if i == 4 else 1.0
                assert d.upload(t, d.update_bytes(state, seed=10 * r + i, step=0.02, direction=direction,
                                                  factor=f, noise=0.3)).accepted
    finally:
        for d in devs:
            d.close()
        server.stop(0)
    assert [x["state"] for x in c.store.rounds()][:rounds] == ["aggregated"] * rounds
    return c


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_malicious_device_effect_is_bounded(templates, strategy):
    tmp, tpls = templates
    tpl = tpls[strategy]
    g0 = Coordinator(tpl)
    before = _flat_global(g0)
    g0.close()
    probe = _one_round(tmp, tpl, f"{strategy}-probe", 1.0, clip_norm=1e9)  # update route, plain mean, no clip
    clean = _flat_global(probe) - before
    norms = probe.store.rounds()[0]["metrics"]["update_norms"]
    probe.close()
    C = 1.5 * sorted(norms)[len(norms) // 2]
    table = {}
    for attack, factor in ATTACKS.items():
        for name, d in DEFENCES.items():
            kw = {} if d is None else {"clip_norm": C if d.get("clip") else 1e9, "robust": d.get("robust", "none")}
            c = _one_round(tmp, tpl, f"{strategy}-{attack}-{name}", factor, **kw)
            table[(attack, name)] = float((_flat_global(c) - before - clean).norm() / clean.norm())
            c.close()
    print(f"\n{strategy}: relative error of the new global vs the clean round (|G - G_clean| / |G_clean - G_0|), "
          f"clip C={C:.3g}, honest update norms {[round(n, 3) for n in norms]}")
    print(f"{'attack':>8} " + " ".join(f"{n:>18}" for n in DEFENCES))
    for attack in ATTACKS:
        print(f"{attack:>8} " + " ".join(f"{table[(attack, n)]:18.3f}" for n in DEFENCES))
    for attack in ("x100", "flip"):
        undefended = table[(attack, "mean")]
        assert undefended > 3.0, f"{attack}: the attack should hurt without a defence ({undefended:.3f})"
        for name in ("clip+trimmed_mean", "clip+median"):
            assert table[(attack, name)] < 1.0, f"{strategy} {attack} {name}: {table[(attack, name)]:.3f}"
            assert table[(attack, name)] < undefended / 5
        assert table[(attack, "clip")] < undefended / 3
    for name in ("clip", "clip+trimmed_mean", "clip+median"):  # without an attacker a defence costs little
        assert table[("clean", name)] < 1.0, (name, table[("clean", name)])


def test_dp_rounds_report_epsilon(templates, capsys):
    tmp, tpls = templates
    sigma, C, delta = 1.0, 0.5, 1e-5
    c = _one_round(tmp, tpls["zero_pad"], "dp", 1.0, rounds=2, clip_norm=C, dp_noise=sigma, dp_delta=delta)
    rounds = c.store.rounds()
    eps = [r["metrics"]["dp_epsilon"] for r in rounds[:2]]
    expected = epsilon_per_round(DPConfig(clip_norm=C, noise_multiplier=sigma, sample_rate=1.0, delta=delta), 2)
    print(f"\nDP sigma={sigma} C={C} delta={delta}: epsilon per round {eps} (accountant: {expected})")
    assert eps == pytest.approx(expected, rel=1e-9) and eps[0] < eps[1]
    assert all(r["metrics"]["dp_noise_std"] == pytest.approx(sigma * C) for r in rounds[:2])
    assert torch.isfinite(_flat_global(c)).all()
    store = c.cfg.store
    c.close()
    capsys.readouterr()
    assert coordinator_main(["status", "--store", store, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert [d["epsilon"] for d in s["dp"]] == pytest.approx(eps)
    assert coordinator_main(["status", "--store", store]) == 0
    assert "DP epsilon per round" in capsys.readouterr().out
