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


def _run(fleet, strategy: str, rounds: int, nodes=None, **extra):
    """Run the deployment ServerApp (server_fn) against ClientApps in process; returns (strategy, server)."""
    from flwr.server import ServerApp

    from coordinator.flower_loopback import Node, run_inprocess
    from coordinator.flower_strategy import server_fn
    from edge_runtime.flower_client import app, clear_runtimes

    clear_runtimes()
    held = {}

    def fn(ctx):
        comps = server_fn(ctx)
        held["server"] = comps.server
        return comps

    nodes = nodes if nodes is not None else [Node(app, nc) for nc in fleet["nodes"]]
    run_config = {"model": fleet["model"], "strategy": strategy, "num-server-rounds": rounds, "max-rank": MAX_RANK,
                  "lora-alpha": ALPHA, "local-steps": 2, "lr": 1e-2, "zo-lr": 1e-3, "min-clients": len(nodes),
                  "max-workers": 1, **extra}
    run_inprocess(ServerApp(server_fn=fn), nodes, run_config)
    server = held["server"]
    return server.strategy, server


def _device_states(strat, name: str):
    """Decode the last round's raw FitRes independently of the strategy, as our coordinator would."""
    from flwr.common import parameters_to_ndarrays

    from coordinator.aggregation import DeviceState, zo_replay_update

    rec = strat.last
    devices = []
    for cid, res in sorted(rec.results.items()):
        arrays, keys = parameters_to_ndarrays(res.parameters), json.loads(res.metrics["keys"])
        sent = rec.sent[cid].tensors
        if res.metrics["mode"] == "zo":
            start = {k: v for k, v in sent.items() if not k.startswith("base_delta.")}
            state = zo_replay_update(start, list(zip(arrays[0].tolist(), arrays[1].tolist())), res.metrics["zo_lr"])
        else:
            state = {k: torch.from_numpy(a.astype(np.float32)) for k, a in zip(keys, arrays)}
            if not strat.method.shares_b:  # fedsa: B stays on the device; the coordinator aggregates A only
                for k in [k for k in state if k.endswith(".lora_A.weight")]:
                    module = k[: -len(".lora_A.weight")]
                    state[module + ".lora_B.weight"] = torch.zeros(rec.before.modules[module].shape[0], state[k].shape[0])
        devices.append(DeviceState(state=state, alpha=ALPHA, weight=float(res.num_examples)))
    return devices


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def _svd_sum(ups):
    """The exact weighted sum of the devices' products as SVD-ordered factors (scale 1)."""
    from coordinator.aggregation import factor_svd, validate_updates
    from coordinator.aggregation.svd import factors_from_svd, stacked_factors

    ups = validate_updates(ups)
    U, S, Vh = factor_svd(*stacked_factors(ups))
    return factors_from_svd(U, S, Vh, int(S.shape[0]), 1.0, float(sum(u.weight for u in ups)))


def _fedsa_a(ups):
    from coordinator.aggregation import LoraUpdate, fedsa

    A = fedsa(ups, MAX_RANK)
    return LoraUpdate(A=A, B=torch.zeros(ups[0].shape[0], A.shape[0]), scale=1.0)


def _check_last_round_against_coordinator(strat, name: str) -> None:
    from coordinator.aggregation import aggregate_modules, effective, fedavg, stack, zero_pad

    g, rec = strat.global_state, strat.last
    assert g.strategy == name == strat.method.name
    devices = _device_states(strat, name)
    assert not rec.rejected and len(devices) == len(rec.uploads)
    if name in ("zero_pad", "fedsa", "fedavg", "zo"):
        combine = {"zero_pad": lambda ups: zero_pad(ups, MAX_RANK), "fedsa": _fedsa_a, "fedavg": fedavg,
                   "zo": fedavg}[name]
        ref = aggregate_modules(devices, combine)
        for m, u in ref.modules.items():
            assert _close(g.modules[m].A, u.A), m
            if name != "fedsa":
                assert _close(effective(g.modules[m]), effective(u)), m
    elif name == "svd":
        ref = aggregate_modules(devices, _svd_sum)
        for m, u in ref.modules.items():
            assert _close(effective(g.modules[m]), effective(u)), m
    else:  # stack: the cumulative delta grows by exactly this round's stacked update
        ref = aggregate_modules(devices, stack)
        for m, u in ref.modules.items():
            assert _close(effective(g.modules[m]), effective(rec.before.modules[m]) + effective(u)), m
    for k, v in ref.extra.items():
        assert _close(g.extra[k], v), k


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
    _check_last_round_against_coordinator(strat, "zero_pad")
    rec = strat.last
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
    zo_cid = next(c for c, i in strat.clients.items() if i.mode == "zo")
    assert runtimes[int(zo_cid)].plan.mode == "zo"
    assert not all(torch.equal(rec.sent[zo_cid].tensors[k], v) for k, v in
                   next(u for u in rec.uploads if u.device_id == zo_cid).state.items())
    got = parameters_to_ndarrays(server.parameters)  # Flower's own copy of the global
    want = export_state(strat.global_state, strat.method)
    assert len(got) == len(want) and all(np.allclose(a, want[k].numpy()) for a, k in zip(got, sorted(want)))


@needs_flwr
@pytest.mark.parametrize("name,rounds", [("stack", 2), ("fedsa", 2), ("svd", 1)])
def test_heterogeneous_strategies_match_coordinator(fleet, name, rounds):
    strat, _ = _run(fleet, name, rounds=rounds)
    assert len({i.rank for i in strat.clients.values()}) == 3
    assert [r["uploads"] for r in strat.rounds] == [4] * rounds
    _check_last_round_against_coordinator(strat, name)
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
