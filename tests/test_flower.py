"""Flower interop: our strategies as a Flower Strategy, our device runtime as a Flower ClientApp.

A real Flower ServerApp (legacy Server loop + HeteroLoraStrategy) talks to real ClientApps
(edge_runtime.flower_client.app: profile -> plan -> LocalTrainer) through Flower's own
FitIns/FitRes <-> RecordDict conversions, over an in-process Grid (no Ray: see
coordinator/flower_loopback.py). Four heterogeneous devices on a tiny BERT: three LoRA
devices planned from repo profiles and capped to ranks 8/4/2, one planned into ZO mode.
Every aggregate is checked against coordinator.aggregation on the same updates.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from coordinator.round_policy import RoundPolicy
from protos import flower_pack as P

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
HAS_FLWR = importlib.util.find_spec("flwr") is not None
needs_flwr = pytest.mark.skipif(not HAS_FLWR, reason="flwr is not installed (optional extra 'flower': "
                                                     "pip install flwr==1.42.0)")
MAX_RANK, ALPHA = 8, 16.0
LORA_DEVICES = [("laptop-cpu-16gb", None), ("raspberry-pi-5-8gb", 4), ("jetson-nano-4gb", 2)]


# -- packing (no Flower needed) ---------------------------------------------------------------
def test_state_and_zo_packing_roundtrip_and_errors():
    state = {"m.lora_B.weight": torch.randn(6, 2), "m.lora_A.weight": torch.randn(2, 5), "head.bias": torch.randn(3)}
    arrays, keys = P.state_to_arrays(state)
    assert json.loads(keys) == sorted(state) and [a.dtype for a in arrays] == [np.float32] * 3
    back = P.arrays_to_state(arrays, keys)
    assert all(torch.equal(back[k], state[k]) for k in state)
    half, _ = P.state_to_arrays(state, "fp16")
    assert half[0].dtype == np.float16
    pairs = [(12345678901, -0.25), (7, 1e-3)]
    zarr, zkeys = P.zo_to_arrays(pairs)
    assert P.arrays_to_zo(zarr, zkeys) == pairs
    with pytest.raises(P.PackError, match="2 arrays for 3 keys"):
        P.arrays_to_state(arrays[:2], keys)
    with pytest.raises(P.PackError, match="twice"):
        P.decode_keys('["a", "a"]')
    with pytest.raises(P.PackError, match="non-finite"):
        P.arrays_to_zo([zarr[0], np.array([np.nan, 1.0])], zkeys)
    with pytest.raises(P.PackError, match="ZO update"):
        P.arrays_to_zo(arrays, keys)


def test_core_modules_do_not_import_flwr():
    code = ("import sys; import coordinator.cli, coordinator.service, coordinator.methods, coordinator.engine, "
            "edge_runtime.cli, "
            "edge_runtime.client, protos.flower_pack; bad = [m for m in sys.modules if m.split('.')[0] == 'flwr']; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Tiny BERT, four data shards (JSONL) and four device node configs (three LoRA, one ZO)."""
    from edge_runtime.data import load_sst2, partition
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.planner import plan
    from edge_runtime.profile import profile_from_dict
    from edge_runtime.training.tiny import make_tiny_bert

    tmp = tmp_path_factory.mktemp("flower")
    model = make_tiny_bert(tmp / "bert", hidden=32, vocab_size=300)
    shards = partition(load_sst2("train", limit=64), 4, "iid", seed=0)
    data = []
    for i, shard in enumerate(shards):
        p = tmp / f"shard{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in shard))
        data.append(p)
    spec = load_model_spec(model)
    zo_profile = None
    from edge_runtime.planner import MIN_MARGIN_BYTES
    margin_kb = MIN_MARGIN_BYTES // 1024  # every plan keeps this free
    for kb in range(1200 + margin_kb, 200 + margin_kb, -20):  # the largest budget only a ZO plan meets
        d = {"name": "emu-zo-tiny", "kind": "emulated", "memory_total": "1GiB", "memory_budget": kb * 1024,
             "compute_gflops": {"fp32": 5.0}, "precisions": ["fp32"], "budget_excludes_runtime": True}
        try:
            if plan(profile_from_dict(d), spec, "classification", data_examples=16, overhead_bytes=0,
                    alternatives=[]).mode == "zo":
                zo_profile = d
                break
        except ValueError:
            continue
    assert zo_profile is not None, "no memory budget makes the planner choose ZO for the tiny model"
    (tmp / "zo.yaml").write_text(yaml.safe_dump(zo_profile))
    nodes = [{"model": str(model), "profile": str(ROOT / "profiles" / f"{name}.yaml"), "data": str(data[i]),
              "enforce-budget": False, "threads": 1, **({"max-rank": cap} if cap else {})}
             for i, (name, cap) in enumerate(LORA_DEVICES)]
    nodes.append({"model": str(model), "profile": str(tmp / "zo.yaml"), "data": str(data[3]), "enforce-budget": False,
                  "threads": 1})
    return {"model": str(model), "nodes": nodes}


def _run(fleet, strategy: str, rounds: int, nodes=None, policy=None, **extra):
    """Run the deployment ServerApp (server_fn) against ClientApps in process; returns (strategy, server).

    policy: a RoundPolicy the strategy is constructed with (server_fn's run config has none; default
    RoundPolicy())."""
    import dataclasses
    from unittest import mock

    from flwr.server import ServerApp

    import coordinator.flower_strategy as fs
    from coordinator.flower_loopback import Node, run_inprocess
    from coordinator.flower_strategy import server_fn
    from edge_runtime.flower_client import app, clear_runtimes

    clear_runtimes()
    held = {}

    def fn(ctx):
        comps = server_fn(ctx)
        held["server"] = comps.server
        return comps

    real = fs.HeteroLoraStrategy

    def with_policy(init, cfg, **kw):  # server_fn builds FlowerConfig itself: swap in our policy
        return real(init, cfg if policy is None else dataclasses.replace(cfg, policy=policy), **kw)

    nodes = nodes if nodes is not None else [Node(app, nc) for nc in fleet["nodes"]]
    run_config = {"model": fleet["model"], "strategy": strategy, "num-server-rounds": rounds, "max-rank": MAX_RANK,
                  "lora-alpha": ALPHA, "local-steps": 2, "lr": 1e-2, "zo-lr": 1e-3, "min-clients": len(nodes),
                  "max-workers": 1, **extra}
    with mock.patch.object(fs, "HeteroLoraStrategy", with_policy):
        run_inprocess(ServerApp(server_fn=fn), nodes, run_config)
    server = held["server"]
    assert server.strategy.policy == (policy or RoundPolicy())
    return server.strategy, server


def _device_uploads(strat):
    """Decode the last round's raw FitRes independently of the strategy, as our coordinator would:
    per client (sorted by id) its mode, final adapter state (ZO: replayed from exactly what it was
    sent), its start (what it downloaded, base delta excluded), its examples and reported progress."""
    from flwr.common import parameters_to_ndarrays

    from coordinator.aggregation import zo_replay_update

    rec = strat.last
    devices = []
    for cid, res in sorted(rec.results.items()):
        arrays, keys = parameters_to_ndarrays(res.parameters), json.loads(res.metrics["keys"])
        start = {k: v for k, v in rec.sent[cid].tensors.items() if not k.startswith("base_delta.")}
        mode = res.metrics["mode"]
        if mode == "zo":
            state = zo_replay_update(start, list(zip(arrays[0].tolist(), arrays[1].tolist())), res.metrics["zo_lr"])
        else:
            state = {k: torch.from_numpy(a.astype(np.float32)) for k, a in zip(keys, arrays)}
        progress = res.metrics.get("loss_progress")
        devices.append({"cid": cid, "mode": mode, "state": state, "start": start,
                        "examples": float(max(int(res.num_examples), 1)),
                        "progress": None if progress is None else float(progress),
                        "loss": res.metrics.get("train_loss")})
    return devices


def _zo_factor(progress: float, lora_progress: list[float]) -> float:
    """A ZO device's weight multiplier (coordinator.round_policy): min(1, its loss progress / the LoRA
    devices' mean), floored at 0.01 so it stays in the sum; 1 without a positive LoRA reference."""
    ref = sum(lora_progress) / len(lora_progress) if lora_progress else 0.0
    return 1.0 if ref <= 0 else min(1.0, max(0.01, max(0.0, progress) / ref))


def _weights(devices, policy) -> dict[str, float]:
    """Client -> aggregation weight: its examples and reported training loss through the policy
    (examples ** temper, capped, x the loss factor), a ZO client's times `_zo_factor` when the policy
    weights ZO devices by their progress."""
    lora = [d["progress"] for d in devices if d["mode"] != "zo" and d["progress"] is not None]
    assert all(d["loss"] is not None for d in devices)  # every client reports its training loss
    return {d["cid"]: policy.weight(d["examples"], d["loss"]) * (
        _zo_factor(d["progress"], lora) if policy.zo_progress and d["mode"] == "zo" and d["progress"] is not None
        else 1.0) for d in devices}


def _factors(state, module: str, out_dim: int):
    """(A (r, in), B (out, r)) of `module` in a state dict, float64; a missing B (kept on the device,
    or not sent) is zero."""
    A = state[module + ".lora_A.weight"].double()
    B = state.get(module + ".lora_B.weight")
    return A, (torch.zeros(out_dim, A.shape[0], dtype=torch.float64) if B is None else B.double())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def _check_last_round_against_coordinator(strat, name: str, zo_progress: bool = True) -> dict[str, float]:
    """The strategy's new global == the round's definition built here from the raw FitRes and what
    each client was sent (A0/B0), with p_k = w_k / sum w:

    - fixed shape (zero_pad, fedavg, zo, fedsa): the mean CHANGE, zero-padded to max rank at the
      max-rank scale s, added to the old global G: A = G.A + sum p_k pad(A_k - A0_k),
      s B = G.scale G.B + sum p_k s_k pad(B_k - B0_k) (fedsa: A only, B never leaves the devices);
    - svd: dW = dW_G + sum p_k s_k (B_k A_k - B0_k A0_k);
    - stack: fresh adapters (B0 = 0): dW = dW_G + sum p_k s_k B_k A_k.
    Extras (the head) are the weighted mean of the uploads'. Returns the weights used."""
    from coordinator.aggregation import LoraUpdate, effective, fedavg, fedsa, lora_scale, zero_pad

    g, rec = strat.global_state, strat.last
    assert g.strategy == name == strat.method.name
    assert strat.policy.zo_progress == zo_progress
    devices = _device_uploads(strat)
    assert not rec.rejected and len(devices) == len(rec.uploads)
    w = _weights(devices, strat.policy)
    W = sum(w.values())
    assert g.total_weight == pytest.approx(W, rel=1e-12)
    s = lora_scale(ALPHA, MAX_RANK)
    for m, G in rec.before.modules.items():
        out_dim = G.shape[0]
        if name in ("zero_pad", "fedavg", "zo", "fedsa"):
            changes = []
            for d in devices:
                A, B = _factors(d["state"], m, out_dim)
                A0, B0 = _factors(d["start"], m, out_dim)
                changes.append(LoraUpdate(A=(A - A0).float(), B=(B - B0).float(), scale=lora_scale(ALPHA, A.shape[0]),
                                          weight=w[d["cid"]]))
            if name == "fedsa":
                assert _close(g.modules[m].A, G.A.double() + fedsa(changes, MAX_RANK).double()), m
                assert not g.modules[m].B.any(), m  # no global B
                continue
            mean = fedavg(changes) if name in ("fedavg", "zo") else zero_pad(changes, MAX_RANK)
            assert g.modules[m].scale == s and g.modules[m].rank == MAX_RANK, m
            assert _close(g.modules[m].A, G.A.double() + mean.A.double()), m
            assert _close(g.modules[m].B.double() * s, G.B.double() * G.scale + mean.B.double() * mean.scale), m
        else:  # svd / stack: the change of each device's product
            want = effective(G)
            for d in devices:
                A, B = _factors(d["state"], m, out_dim)
                A0, B0 = _factors(d["start"], m, out_dim)
                if name == "stack":
                    assert not B0.any(), (m, d["cid"])  # a fresh adapter: B0 = 0
                want = want + (w[d["cid"]] / W) * lora_scale(ALPHA, A.shape[0]) * (B @ A - B0 @ A0)
            assert _close(effective(g.modules[m]), want), m
    extra_keys = set(devices[0]["state"]) - {k for k in devices[0]["state"] if ".lora_" in k}
    assert extra_keys and sorted(extra_keys) == sorted(g.extra)
    for k in extra_keys:
        want = sum(w[d["cid"]] * d["state"][k].double() for d in devices) / W
        assert _close(g.extra[k], want), k
    return w


# -- federations ------------------------------------------------------------------------------
@needs_flwr
def test_zero_pad_federation_matches_coordinator_and_replays_zo_exactly(fleet):
    from flwr.common import parameters_to_ndarrays

    from coordinator.aggregation import lora_scale, to_scale, truncate
    from coordinator.flower_strategy import export_state
    from edge_runtime.flower_client import cached_runtimes

    strat, server = _run(fleet, "zero_pad", rounds=2, **{"fraction-evaluate": 1.0})
    assigned = sorted((int(c), (i.rank, i.mode)) for c, i in strat.clients.items())
    assert [a for _, a in assigned] == [(8, "lora"), (4, "lora"), (2, "lora"), (8, "zo")]
    assert [r["uploads"] for r in strat.rounds] == [4, 4] and strat.rounds[-1]["zo_uploads"] == 1
    ev = strat.evaluations  # federated evaluation: every device scores the global at its own rank
    assert [e["clients"] for e in ev] == [4, 4] and all(0 <= e["accuracy"] <= 1 and e["loss"] > 0 for e in ev)
    w = _check_last_round_against_coordinator(strat, "zero_pad")  # default policy: ZO weighted by its progress
    rec = strat.last
    zo_cid = next(c for c, i in strat.clients.items() if i.mode == "zo")
    examples = {c: float(max(int(r.num_examples), 1)) for c, r in rec.results.items()}
    lora = [float(r.metrics["loss_progress"]) for c, r in rec.results.items() if c != zo_cid]
    loss = {c: float(r.metrics["train_loss"]) for c, r in rec.results.items()}
    weight = strat.policy.weight  # the default policy: examples ** 0.5 x min(1, loss / ln 2)
    assert all(w[c] == pytest.approx(weight(examples[c], loss[c])) for c in w if c != zo_cid)  # LoRA devices
    factor = _zo_factor(float(rec.results[zo_cid].metrics["loss_progress"]), lora)
    assert 0.01 <= factor < 1 and w[zo_cid] == pytest.approx(weight(examples[zo_cid], loss[zo_cid]) * factor)
    assert strat.global_state.total_weight < sum(weight(n) for n in examples.values())  # not plain weights
    for cid, sent in rec.sent.items():  # what each device got is our per-rank slice of the global
        want = {k: v for k, v in rec.before.extra.items()}
        for m, u in rec.before.modules.items():  # zero_pad: rows [:r] of A, columns [:, :r] of B, at the device's scale
            mine = to_scale(truncate(u, sent.rank), lora_scale(ALPHA, sent.rank))
            want[m + ".lora_A.weight"], want[m + ".lora_B.weight"] = mine.A, mine.B
        assert sorted(want) == sorted(sent.tensors) and all(_close(want[k], sent.tensors[k]) for k in want)
    runtimes = cached_runtimes()
    for u in rec.uploads:  # device-side final adapters == what the server decoded (ZO: replayed from seeds)
        local = runtimes[int(u.device_id)].trainer.adapter_state()
        assert sorted(local) == sorted(u.state) and all(_close(local[k], u.state[k]) for k in local), u.device_id
    assert runtimes[int(zo_cid)].plan.mode == "zo"
    assert not all(torch.equal(rec.sent[zo_cid].tensors[k], v) for k, v in
                   next(u for u in rec.uploads if u.device_id == zo_cid).state.items())
    got = parameters_to_ndarrays(server.parameters)  # Flower's own copy of the global
    want = export_state(strat.global_state, strat.method)
    assert len(got) == len(want) and all(np.allclose(a, want[k].numpy()) for a, k in zip(got, sorted(want)))


@needs_flwr
def test_cohorts_train_one_group_of_clients_per_round(fleet):
    from coordinator.round_policy import RoundPolicy
    from coordinator.rounds import cohort

    strat, _ = _run(fleet, "zero_pad", rounds=2, policy=RoundPolicy(cohorts=2))
    assert [r["uploads"] for r in strat.rounds] == [2, 2]  # half of the 4 clients each round
    assert sorted(strat.last.results) == sorted(cohort(sorted(strat.clients), 2, 0, 2))  # the coordinator's rule


@needs_flwr
@pytest.mark.parametrize("name,rounds", [("stack", 2), ("fedsa", 2), ("svd", 2)])
def test_heterogeneous_strategies_match_coordinator(fleet, name, rounds):
    strat, _ = _run(fleet, name, rounds=rounds, policy=RoundPolicy.plain())  # weights = examples
    assert len({i.rank for i in strat.clients.values()}) == 3
    assert [r["uploads"] for r in strat.rounds] == [4] * rounds
    w = _check_last_round_against_coordinator(strat, name, zo_progress=False)
    assert w == {c: float(max(int(r.num_examples), 1)) for c, r in strat.last.results.items()}
    if name == "fedsa":  # LoRA devices never send B; the ZO device's B is kept for it by the server
        for cid, res in strat.last.results.items():
            if res.metrics["mode"] == "lora":
                assert not any(k.endswith("lora_B.weight") for k in json.loads(res.metrics["keys"]))
        zo_cid = next(c for c, i in strat.clients.items() if i.mode == "zo")
        kept = {c: t for c, t in strat.kept.items() if t}
        assert list(kept) == [zo_cid] and kept[zo_cid] and all(k.endswith("lora_B.weight") for k in kept[zo_cid])


@needs_flwr
@pytest.mark.parametrize("name", ["fedavg", "zo"])
def test_common_rank_strategies_refuse_low_rank_devices(fleet, name):
    strat, _ = _run(fleet, name, rounds=1)
    assert len(strat.refused) == 2 and all("common rank" in why for why in strat.refused.values())
    modes = sorted(i.mode for i in strat.clients.values())
    assert modes == (["zo", "zo"] if name == "zo" else ["lora", "zo"])
    _check_last_round_against_coordinator(strat, name)


@needs_flwr
def test_malformed_updates_are_rejected_and_the_round_goes_on(fleet):
    from flwr.client import ClientApp, NumPyClient

    from coordinator.flower_loopback import Node
    from edge_runtime.flower_client import app

    class Bad(NumPyClient):
        def get_properties(self, config):
            return {P.PROP_RANK: 4, P.PROP_MODE: "lora"}

        def fit(self, parameters, config):
            keys = json.loads(config[P.KEYS])
            arrays = [np.full_like(a, np.nan) for a in parameters]  # right keys and shapes, NaN values
            return arrays, 10, {P.KEYS: json.dumps(keys), P.CFG_MODE: "lora"}

    class NoPlan(NumPyClient):
        def get_properties(self, config):
            return {}

    nodes = [Node(app, fleet["nodes"][1]), Node(ClientApp(client_fn=lambda ctx: Bad().to_client())),
             Node(ClientApp(client_fn=lambda ctx: NoPlan().to_client()))]
    strat, _ = _run(fleet, "zero_pad", rounds=1, nodes=nodes)
    assert list(strat.refused) == ["3"] and "plan_rank" in strat.refused["3"]
    assert strat.rounds[-1]["uploads"] == 1 and list(strat.last.rejected) == ["2"]
    assert "non-finite" in strat.last.rejected["2"]
    assert [u.device_id for u in strat.last.uploads] == ["1"]
