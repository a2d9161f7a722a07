"""The methods beyond LoRA averaging on the Flower transport: prompt tuning, (IA)3, BitFit and
bottleneck adapters (the download's contract makes every ClientApp rebuild its adapter to the PEFT
type), HetLoRA's rank self-pruning (a device uploads at a lower rank and is assigned it next round)
and FedDPA's personal adapter (kept in the node's state, never uploaded). A real Flower ServerApp
against real ClientApps on the tiny BERT of tests/test_flower.py, in process
(coordinator/flower_loopback.py); every round is checked against the round engine folding the same
uploads."""
from __future__ import annotations

import json

import pytest
import torch

from coordinator.round_policy import RoundPolicy
from protos import peft_types
from test_flower import _close, _device_uploads, _run, fleet, needs_flwr  # noqa: F401  (module fixture)

PEFT_METHODS = {"prompt_tuning": "prompt", "ia3": "ia3", "bitfit": "bitfit",  # method -> the PEFT type it trains
                "adapter": "adapter"}


def _lora_nodes(fleet, **extra):
    """The three LoRA devices of the fleet (ranks 8 / 4 / 2), with `extra` node-config keys."""
    from coordinator.flower_loopback import Node
    from edge_runtime.flower_client import app

    return [Node(app, {**nc, **extra}) for nc in fleet["nodes"][:3]]


def _refold(strat):
    """The last round's global as the round engine gives it from the decoded uploads and what each
    client was sent (plain policy: weights = examples)."""
    from coordinator.engine import RoundEngine

    rec = strat.last
    engine = RoundEngine(strat.method, rec.before, rec.round, strat.config.norm_bound, RoundPolicy.plain())
    for d in _device_uploads(strat):
        engine.accept(d["cid"], d["state"], d["examples"], rec.sent[d["cid"]].tensors, d["mode"],
                      progress=d["progress"])
    return engine.close()[0]


@needs_flwr
def test_peft_types_train_their_own_tensors_on_flower(fleet, tmp_path):
    """prompt_tuning, ia3, bitfit, adapter: every device (plan ranks 8 / 4 / 2) trains the type's tensors, uploads
    exactly them, and the global is their weighted mean; the server evaluates through the same wrapper."""
    from edge_runtime.flower_client import cached_runtimes

    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(["good", "bad"] * 8)))
    for name, kind in PEFT_METHODS.items():
        strat, _ = _run(fleet, name, rounds=2, nodes=_lora_nodes(fleet), policy=RoundPolicy.plain(),
                        **{"eval-data": str(dev), "eval-limit": 16})
        assert not strat.refused and [r["uploads"] for r in strat.rounds] == [3, 3], (name, strat.refused)
        g, rec = strat.global_state, strat.last
        assert not g.modules and g.extra and not rec.rejected, name
        for cid, res in rec.results.items():  # what travelled: the type's tensors (+ the head), nothing else
            keys = json.loads(res.metrics["keys"])
            assert keys == sorted(g.extra) == sorted(rec.sent[cid].tensors), (name, cid)
            t = cached_runtimes()[int(cid)].trainer
            t = getattr(t, "inner", t)  # the LocalTrainer inside the OOM step-down wrapper
            assert t.peft == kind and sorted(t.adapter_state()) == keys, (name, cid, t.peft)
        moved = [k for k in g.extra if not peft_types.is_head_key(k) and not torch.equal(g.extra[k], rec.before.extra[k])]
        assert moved, f"{name}: the global's {kind} tensors did not move"
        ups = _device_uploads(strat)
        W = sum(d["examples"] for d in ups)
        for k in g.extra:  # the weighted mean of the uploaded tensors
            assert _close(g.extra[k], sum(d["examples"] * d["state"][k].double() for d in ups) / W), (name, k)
        m = strat.evaluate_fn(g)
        assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0, (name, m)


@needs_flwr
def test_hetlora_devices_prune_on_flower_and_are_assigned_the_pruned_rank(fleet, tmp_path):
    """With prune-threshold 0.5 the devices drop trailing rank slots after round 1, upload at the lower
    rank, and are sent (and upload) that rank in round 2; the round folds like the engine."""
    strat, _ = _run(fleet, "hetlora", rounds=2, nodes=_lora_nodes(fleet), policy=RoundPolicy.plain(),
                    **{"prune-threshold": 0.5, "journal": str(tmp_path / "journal")})
    assert strat.method.cfg.prune_threshold == 0.5 and [r["uploads"] for r in strat.rounds] == [3, 3]
    rows = [json.loads(line) for line in (tmp_path / "journal" / "rounds.jsonl").read_text().splitlines()]
    r1, r2 = (next(r["clients"] for r in rows if r.get("round") == n and "clients" in r) for n in (1, 2))
    pruned = [c for c in r1 if r2[c]["rank"] < r1[c]["rank"]]
    assert pruned, f"no device pruned its rank: {r1} {r2}"
    for c in pruned:  # the smaller rank is what it trains and sends next
        assert r2[c]["bytes_up"] < r1[c]["bytes_up"] and r2[c]["bytes_down"] < r1[c]["bytes_down"], (r1[c], r2[c])
    print(f"\nhetlora on Flower, threshold 0.5: ranks round 1 {[r1[c]['rank'] for c in sorted(r1)]} -> round 2 "
          f"{[r2[c]['rank'] for c in sorted(r2)]}; bytes up {[r1[c]['bytes_up'] for c in sorted(r1)]} -> "
          f"{[r2[c]['bytes_up'] for c in sorted(r2)]}")
    for d in _device_uploads(strat):  # round 2: one rank per upload, reported, at most what the client was sent
        res, cid = strat.last.results[d["cid"]], d["cid"]
        ranks = {v.shape[0] for k, v in d["state"].items() if k.endswith(".lora_A.weight")}
        assert ranks == {int(res.metrics["rank"])} and int(res.metrics["rank"]) <= strat.last.sent[cid].rank
        assert strat.clients[cid].rank == int(res.metrics["rank"])  # a round-2 pruning is assigned in round 3
    want = _refold(strat)
    for m, u in strat.global_state.modules.items():
        assert _close(u.A, want.modules[m].A) and _close(u.B * u.scale, want.modules[m].B * want.modules[m].scale), m


@needs_flwr
def test_feddpa_personal_adapter_stays_on_the_flower_device(fleet, tmp_path):
    """feddpa at rank 2: each ClientApp trains rank 2 + 2 (global + personal), uploads only the rank-2
    global adapter, keeps the personal slots in its node state (trained: B no longer zero), and reports
    its personalized accuracy on its held-out rows, which the round metrics average."""
    from edge_runtime.flower_client import cached_runtimes
    from edge_runtime.training.personal import PERSONAL

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(["fine", "awful"] * 6)))
    strat, _ = _run(fleet, "feddpa", rounds=2, nodes=_lora_nodes(fleet, **{"eval-data": str(held)}),
                    policy=RoundPolicy.plain(), **{"max-rank": 2, "fraction-evaluate": 1.0})
    assert not strat.refused and [r["uploads"] for r in strat.rounds] == [3, 3]
    assert all(r["device_holdout_n"] == 3 and 0 <= r["device_holdout_accuracy"] <= 1 for r in strat.rounds)
    assert [e["clients"] for e in strat.evaluations] == [3, 3]  # federated evaluation: global + own personal
    rec = strat.last
    for cid, res in rec.results.items():
        keys = json.loads(res.metrics["keys"])
        assert keys == sorted(k for k in rec.sent[cid].tensors if not k.startswith("base_delta."))
        assert not any(k.startswith(PERSONAL) for k in keys) and int(res.metrics["rank"]) == 2
        rt = cached_runtimes()[int(cid)]
        assert rt.trainer.rank == 4  # 2 global + 2 personal slots
        mine = {k[len(PERSONAL):]: v for k, v in rt.kept.items() if k.startswith(PERSONAL)}
        assert mine and all(v.shape[0 if k.endswith(".lora_A.weight") else 1] == 2 for k, v in mine.items())
        assert any(k.endswith(".lora_B.weight") and v.abs().sum() > 0 for k, v in mine.items()), cid
    assert all(v.shape[0] == 2 for d in _device_uploads(strat) for k, v in d["state"].items()
               if k.endswith(".lora_A.weight"))
    want = _refold(strat)
    for m, u in strat.global_state.modules.items():
        assert _close(u.A, want.modules[m].A) and _close(u.B * u.scale, want.modules[m].B * want.modules[m].scale), m


@needs_flwr
def test_ffa_rolora_fedex_fold_like_the_engine_on_flower(fleet):
    """The frozen-factor methods (ffa: A frozen; rolora: B in odd rounds, A in even ones) and FedEx-LoRA
    (its residual travels as a base delta) over ranks 8 / 4 / 2: two rounds, every upload accepted, the
    global equals the round engine's fold of the same uploads (base residual included)."""
    for name in ("ffa", "rolora", "fedex"):
        strat, _ = _run(fleet, name, rounds=2, nodes=_lora_nodes(fleet), policy=RoundPolicy.plain())
        assert not strat.refused and [r["uploads"] for r in strat.rounds] == [3, 3] and not strat.last.rejected, name
        g, want = strat.global_state, _refold(strat)
        for m, u in g.modules.items():
            assert _close(u.A, want.modules[m].A) and _close(u.B * u.scale, want.modules[m].B * want.modules[m].scale)
        assert sorted(g.base) == sorted(want.base), name
        for m, b in g.base.items():
            assert _close(b.A, want.base[m].A) and _close(b.B * b.scale, want.base[m].B * want.base[m].scale), m
        if name == "ffa":  # the ClientApps honoured the frozen A: uploaded as sent
            for d in _device_uploads(strat):
                assert all(torch.equal(v, d["start"][k]) for k, v in d["state"].items() if k.endswith(".lora_A.weight"))
        if name == "fedex":
            assert g.base and all(any(k.startswith("base_delta.") for k in s.tensors) for s in strat.last.sent.values())


def test_flower_sim_offers_every_registered_method():
    """tools/flower_sim.py's --strategy choices are the registry's (no hard-coded list)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import flower_sim

    from coordinator.methods import NAMES

    for name in NAMES:
        assert flower_sim.parse_args(["--model", "m", "--strategy", name]).strategy == name
    with pytest.raises(SystemExit):
        flower_sim.parse_args(["--model", "m", "--strategy", "krum"])


@needs_flwr
def test_svd_initialisations_run_on_flower(fleet):
    """init federa: round 1 starts from the base weights' SVD and every download carries the residual as
    base_delta factors; init slora (1 sparse round of 2): the ClientApps train the sparse delta in round 1,
    then LoRA with the delta frozen (sent, not uploaded) in round 2. Both fold like the round engine."""
    from protos.sparse import SPARSE_SUFFIX

    strat, _ = _run(fleet, "fedavg", rounds=1, nodes=_lora_nodes(fleet), policy=RoundPolicy.plain(),
                    **{"max-rank": 2, "init": "federa"})
    rec = strat.last
    assert not strat.refused and strat.rounds[0]["uploads"] == 3 and rec.before.base
    for m, b in rec.before.base.items():  # the residual -s B0 A0 of the SVD start
        assert torch.equal(b.A, rec.before.modules[m].A) and torch.equal(b.B, -rec.before.modules[m].B), m
    assert all(any(k.startswith("base_delta.") for k in s.tensors) for s in rec.sent.values())
    want = _refold(strat)
    assert all(_close(u.A, want.modules[m].A) for m, u in strat.global_state.modules.items())

    strat, _ = _run(fleet, "fedavg", rounds=2, nodes=_lora_nodes(fleet), policy=RoundPolicy.plain(),
                    **{"max-rank": 2, "init": "slora", "slora-rounds": 1, "slora-density": 0.05})
    rec, g = strat.last, strat.global_state
    sparse = [k for k in g.extra if k.endswith(SPARSE_SUFFIX)]
    assert sparse and all(g.extra[k].abs().sum() > 0 for k in sparse)  # trained by the devices in round 1
    assert not strat.refused and [r["uploads"] for r in strat.rounds] == [3, 3]
    for cid, res in rec.results.items():  # round 2: the delta is sent (applied, frozen), not uploaded
        assert set(sparse) <= set(rec.sent[cid].tensors)
        assert not any(k.endswith(SPARSE_SUFFIX) for k in json.loads(res.metrics["keys"])), cid


@needs_flwr
def test_bad_method_settings_on_flower_are_named_before_the_model_loads():
    from flwr.app import Context, RecordDict

    from coordinator.flower_strategy import HeteroLoraStrategy, server_fn

    def serve(**rc):
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"model": "/no/model", **rc})
        return server_fn(ctx)

    with pytest.raises(ValueError, match="--init slora needs --slora-rounds"):
        serve(strategy="fedavg", init="slora")
    with pytest.raises(ValueError, match="slora-rounds=3: the sparse stage must end before the last round"):
        serve(strategy="fedavg", init="slora", **{"slora-rounds": 3, "slora-density": 0.02, "num-server-rounds": 3})
    with pytest.raises(ValueError, match="--prune-threshold 0.5: strategy 'zero_pad' trains fixed ranks.*hetlora"):
        serve(strategy="zero_pad", **{"prune-threshold": 0.5})
    with pytest.raises(ValueError, match="unknown method 'krum'; choose one of .*bitfit"):
        serve(strategy="krum")
    state = {"m.lora_A.weight": torch.zeros(8, 4), "m.lora_B.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="init 'federa' starts from the SVD of the base weights: pass base_weights"):
        HeteroLoraStrategy(state, strategy="fedavg", init="federa")
