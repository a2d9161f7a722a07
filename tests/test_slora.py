"""SLoRA (`--init slora`): the shared sparse mask, the options refused with clear errors, the switch
from the sparse stage to LoRA leaving the model unchanged (on the coordinator's evaluator and on a
device's trainer), and a federation over real gRPC with MiniLM: a sparse round, then LoRA rounds."""
from __future__ import annotations

import json

import pytest
import torch

from coordinator.engine import RoundEngine, global_from_bytes
from coordinator.init_global import initial_global
from coordinator.methods import MethodConfig, make_method
from coordinator.slora import sparse_deltas, switch
from protos import wire
from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract
from protos.sparse import SPARSE_SUFFIX, densify, mask_indices, mask_size, module_of_sparse
from tests.waiting import join_device, run_devices

SLORA = {"init": "slora", "slora_rounds": 1, "slora_density": 0.02}


def test_mask_is_shared_and_sparse():
    a = mask_indices(3, "m.query", (40, 30), 0.05)
    assert torch.equal(a, mask_indices(3, "m.query", (40, 30), 0.05))  # both sides derive the same mask
    assert a.numel() == mask_size((40, 30), 0.05) == 60 and a.unique().numel() == 60
    assert not torch.equal(a, mask_indices(3, "m.value", (40, 30), 0.05))  # one mask per module
    D = densify(torch.arange(1.0, 61.0), a, (40, 30))
    assert int((D != 0).sum()) == 60 and torch.equal(D.view(-1)[a], torch.arange(1.0, 61.0))
    c = DeviceContract(frozen=(SPARSE_SUFFIX,), sparse_density=0.02, sparse_seed=7)
    assert DeviceContract.from_meta({"device_contract": c.to_meta()}) == c


@pytest.mark.parametrize("kw, match", [
    ({"init": "slora"}, "--init slora needs --slora-rounds N"),
    ({"init": "slora", "slora_rounds": 2, "slora_density": 0.9}, r"--slora-density D.*in \(0, 0.5\]"),
    ({"slora_rounds": 2, "slora_density": 0.02}, "they need --init slora"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig("fedavg", max_rank=4, **kw)


def test_methods_without_a_residual_base_or_first_order_devices_are_refused():
    from coordinator.service import CoordinatorConfig

    with pytest.raises(ValueError, match="--init slora: strategy 'svd' does not send a residual base"):
        make_method(MethodConfig("svd", max_rank=4, **SLORA))
    with pytest.raises(ValueError, match="--init slora: strategy 'zo' trains zeroth-order only"):
        make_method(MethodConfig("zo", max_rank=4, **SLORA))
    with pytest.raises(ValueError, match="--slora-rounds 3: the sparse stage must end before the last round"):
        CoordinatorConfig(model="m", store="s", rounds=3, init="slora", slora_rounds=3, slora_density=0.02)


@pytest.fixture(scope="module")
def minilm():
    from tests.models import minilm_dir

    return minilm_dir()


def _sparse_global(minilm, name: str = "fedavg", rank: int = 4):
    """A global at the end of a sparse stage: random values on every module's mask (and a head)."""
    from coordinator.model import initial_adapter_state, load_base_model, resolve_target_modules

    model, tok = load_base_model(str(minilm), "classification", 2, 0)
    targets = resolve_target_modules(model, ["query", "value"])
    method = make_method(MethodConfig(name, max_rank=rank, **SLORA))
    g = initial_global(method, initial_adapter_state(model, targets, rank, 16.0, False, 0), {})
    gen = torch.Generator().manual_seed(0)
    extra = {k: (0.3 * torch.randn(v.shape, generator=gen) if k.endswith(SPARSE_SUFFIX) else v)
             for k, v in g.extra.items()}
    return model, tok, method, g.__class__(g.strategy, g.modules, extra, g.total_weight, g.base)


def test_the_switch_leaves_the_model_unchanged(minilm):
    """D's top-r SVD becomes the LoRA factors, -s B0 A0 the residual base, D stays: the global's
    held-out loss and a device's logits (what it downloads after the switch) are unchanged."""
    from coordinator.model import Evaluator
    from edge_runtime.client import DeltaTracker
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan
    from edge_runtime.training.session import LocalTrainer

    model, tok, method, g = _sparse_global(minilm)
    assert all(float(u.B.abs().max()) == 0 for u in g.modules.values()) and not g.base
    g2 = switch(method, g)
    assert set(g2.base) == set(g.modules) and all(float(u.B.abs().max()) > 0 for u in g2.modules.values())
    for n, u in g2.modules.items():  # the factors are D's best rank-r part
        D = densify(g.extra[n + SPARSE_SUFFIX], mask_indices(0, n, u.shape, 0.02), u.shape).double()
        U, S, Vh = torch.linalg.svd(D)
        assert torch.allclose(u.scale * u.B.double() @ u.A.double(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)
        Bd, Ad = sparse_deltas(method.cfg, g)[n]  # evaluation / export: D as exact factors of rank min(out, in)
        assert Bd.shape[1] == min(D.shape) and torch.allclose((Bd.double() @ Ad.double()), D, atol=1e-6)
    rows = load_sst2("dev", limit=24)
    ev = Evaluator(model, tok, rows, task="classification")
    before, after = ev.evaluate(method.deltas(g), g.extra), ev.evaluate(method.deltas(g2), g2.extra)
    assert after["loss"] == pytest.approx(before["loss"], abs=2e-5)

    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=8, seq_len=48)
    logits, t, tracker = [], LocalTrainer(str(minilm), plan, "classification", seed=0, threads=1), DeltaTracker()
    zeroed = {k: v * 0 if module_of_sparse(k) else v for k, v in g.extra.items()}
    no_delta = g.__class__(g.strategy, g.modules, zeroed, g.total_weight, g.base)
    for glob, rnd in ((no_delta, 1), (g, 1), (g2, 2)):  # a device's view: sparse stage (round 1), after the switch
        engine = RoundEngine(method, glob, rnd)
        tensors, meta = wire.decode_tensors(engine.blob(engine.download(4, "lora", 0), 4, "lora"))
        state, delta = wire.split_download(tensors)
        contract = DeviceContract.from_meta(meta)
        t.attach_sparse(contract.sparse_seed, contract.sparse_density)
        if delta:
            t.merge_base_delta(tracker.increment(delta))
        t.load_adapter_state(state)
        t.model.eval()
        with torch.no_grad():
            batch = t._collate(t.encode(rows[:8]), range(8))
            logits.append(t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        assert (SPARSE_SUFFIX in contract.frozen) == (rnd == 2) and (A_SUFFIX in contract.frozen) == (rnd == 1)
    print("logit change by D", float((logits[1] - logits[0]).abs().max()), "at the switch",
          float((logits[2] - logits[1]).abs().max()))
    assert float((logits[1] - logits[0]).abs().max()) > 1e-2  # D changes the model ...
    assert torch.allclose(logits[1], logits[2], atol=1e-4)  # ... the switch does not


def test_sparse_stage_then_lora_over_grpc(minilm, tmp_path):
    """A coordinator with --init slora (1 sparse round of 3) and two emulated MiniLM devices on
    127.0.0.1. Round 1: the devices send the LoRA factors unchanged and sparse values that moved,
    so the global's delta lies on the mask; the switch at its close leaves a residual base; rounds
    2-3 train LoRA while the sparse delta stays at round 1's values."""
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan

    torch.set_num_threads(1)
    recs = load_sst2("train", limit=96)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=32)))
    coord = Coordinator(CoordinatorConfig(model=str(minilm), store=str(tmp_path / "store"), strategy="fedavg", rounds=3,
                                          min_devices=2, local_steps=3, lr=5e-3, max_rank=4, eval_data=str(ev),
                                          round_timeout_s=120, poll_interval_s=0.2, **SLORA))
    g0 = coord.global_state
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=8, seq_len=48, learning_rate=5e-3)
    outs: dict[str, dict] = {}

    def device(name: str, shard: list[dict]) -> None:
        outs[name] = join_device(port, str(minilm), plan, name, shard, stepdown=False)

    run_devices(server, [(device, (f"d{i}", recs[i::2])) for i in range(2)])
    assert set(outs) == {"d0", "d1"} and all(len(o["rounds"]) == 3 and all(r["accepted"] for r in o["rounds"])
                                             for o in outs.values()), outs
    for u in coord.store.updates(1):  # the sparse round: LoRA frozen, sparse values trained
        sent, _ = wire.split_download(coord.download_tensors(u["download_id"]))
        up, _ = wire.decode_tensors(coord.store.read_blob(u["path"], u["sha256"]))
        for k, v in up.items():
            if module_of_sparse(k):
                assert float((v - sent[k]).abs().max()) > 0, f"{k} did not train"
            elif k.endswith((A_SUFFIX, B_SUFFIX)):
                assert torch.equal(v, sent[k]), f"{k} changed in the sparse stage"
    for u in coord.store.updates(3):  # after the switch the frozen sparse delta is not sent back
        up, _ = wire.decode_tensors(coord.store.read_blob(u["path"], u["sha256"]))
        assert not any(module_of_sparse(k) for k in up) and any(k.endswith(B_SUFFIX) for k in up)
    g = coord.global_state
    assert set(g.base) == set(g.modules), "the switch should leave a residual base on every module"
    s = coord.method.cfg.scale(4)
    for n, u in g.modules.items():
        D = densify(g.extra[n + SPARSE_SUFFIX], mask_indices(0, n, u.shape, 0.02), u.shape)
        off = torch.ones(u.shape, dtype=torch.bool)
        off.view(-1)[mask_indices(0, n, u.shape, 0.02)] = False
        assert float(D.abs().max()) > 0 and float(D[off].abs().max()) == 0  # only masked entries moved
        start = s * g.base[n].B.double() @ g.base[n].A.double()  # -s B0 A0 from the switch
        assert float((s * u.B.double() @ u.A.double() + start).abs().max()) > 0, f"{n}: LoRA did not train"
    rows = coord.store.rounds()
    assert len(rows) == 3 and all(0 < r["metrics"]["loss"] < 10 for r in rows), rows
    g1 = global_from_bytes(coord.store.read_blob(rows[0]["global_path"], rows[0]["global_sha256"]))
    assert g0.extra.keys() == g1.extra.keys() == g.extra.keys()
    for k in (k for k in g.extra if module_of_sparse(k)):  # frozen after the switch (round 1's close)
        assert torch.equal(g1.extra[k], g.extra[k]) and float(g0.extra[k].abs().max()) == 0
    coord.close()
