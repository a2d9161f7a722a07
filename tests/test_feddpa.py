"""Personalized LoRA (FedDPA-style): the slot maths of the dual adapter, and a federation over real
gRPC under a Dirichlet(0.5) label split where each device keeps its personal adapter and uploads
only the global one; on each device's own held-out split the personalized model (final global +
its personal adapter) beats the final global model on average."""
from __future__ import annotations

import random

import pytest
import torch

from coordinator.engine import RoundEngine
from coordinator.methods import MethodConfig, make_method
from edge_runtime.training.personal import PERSONAL, split_personal, with_personal, without_personal
from tests.waiting import join_device, run_devices
from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract
from protos.wire import split_download

NAME = "feddpa"
M = "m"


def test_dual_adapter_round_trip_keeps_both_products():
    g = torch.Generator().manual_seed(0)
    r, L, s_r, s_rl = 2, 3, 8.0, 16.0 / 5
    dl = {M + A_SUFFIX: torch.randn(r, 6, generator=g), M + B_SUFFIX: torch.randn(4, r, generator=g),
          "h": torch.ones(2)}
    fresh = {M + A_SUFFIX: torch.randn(r + L, 6, generator=g), M + B_SUFFIX: torch.zeros(4, r + L), "h": torch.zeros(2)}
    full = with_personal(dl, fresh, {}, r, s_r / s_rl)
    assert full[M + A_SUFFIX].shape == (5, 6) and torch.equal(full["h"], dl["h"])
    prod = s_rl * full[M + B_SUFFIX] @ full[M + A_SUFFIX]
    assert torch.allclose(prod, s_r * dl[M + B_SUFFIX] @ dl[M + A_SUFFIX], atol=1e-5)  # personal B starts at 0
    full[M + B_SUFFIX][:, r:] = 1.0  # "trained" personal slots
    up, mine = split_personal(full, r, s_r / s_rl)
    assert torch.allclose(up[M + B_SUFFIX], dl[M + B_SUFFIX], atol=1e-6) and up[M + A_SUFFIX].shape == (r, 6)
    assert set(mine) == {PERSONAL + M + A_SUFFIX, PERSONAL + M + B_SUFFIX}
    again = with_personal(dl, fresh, mine, r, s_r / s_rl)  # next round: the kept personal slots come back
    assert torch.equal(again[M + B_SUFFIX][:, r:], torch.ones(4, L))
    assert float(without_personal(again, r)[M + B_SUFFIX][:, r:].abs().max()) == 0.0


def test_contract_and_method():
    assert DeviceContract.from_meta({"device_contract": DeviceContract(personal_rank=4).to_meta()}).personal_rank == 4
    with pytest.raises(ValueError, match="personal_rank"):
        DeviceContract(personal_rank=-1)
    m = make_method(MethodConfig(NAME, max_rank=4))
    assert m.contract("lora").personal_rank == 4 and m.contract("zo").personal_rank == 0


@pytest.fixture(scope="module")
def minilm():
    from tests.models import minilm_dir

    return minilm_dir()


def _accuracies(trainer, g, method, holdout: list[dict], r: int) -> tuple[float, float]:
    """(personalized, global) accuracy of one device on its held-out rows: its model after its last
    local round (global part + personal adapter, as it would serve its own users), and the final
    global model (the personal slots zeroed)."""
    personal = trainer.evaluate(holdout)["accuracy"]
    s = method.cfg.scale
    dl, _ = split_download(RoundEngine(method, g, 99).download(r, "lora", 0))
    full = with_personal(dl, trainer.adapter_state(), {}, r, s(r) / s(2 * r))
    trainer.load_adapter_state(without_personal(full, r))
    return personal, trainer.evaluate(holdout)["accuracy"]


def test_personalized_beats_global_over_grpc(minilm, tmp_path):
    from coordinator.round_policy import RoundPolicy
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.data import load_sst2, partition
    from edge_runtime.plan import Plan
    from edge_runtime.training.session import LocalTrainer

    torch.set_num_threads(1)
    shards = partition(load_sst2("train", limit=600), 3, scheme="dirichlet", alpha=0.5, seed=1)  # shares 0.84, 0.45, 0.14
    for i, sh in enumerate(shards):  # partition groups rows by label: shuffle before the held-out cut
        random.Random(i).shuffle(sh)
    r = 4
    coord = Coordinator(CoordinatorConfig(model=str(minilm), store=str(tmp_path / "store"), strategy=NAME, rounds=2,
                                          min_devices=3, local_steps=6, lr=5e-3, max_rank=r, round_timeout_s=120,
                                          poll_interval_s=0.2, policy=RoundPolicy(logit_adjust=0.0)))
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    plan = Plan(rank=r, target_modules=["query", "value"], batch_size=16, seq_len=48, learning_rate=5e-3)
    trainers, outs = {}, {}

    def device(i: int, train: list[dict], holdout: list[dict]) -> None:
        def factory(model, p, task, memory_budget_bytes=None, seed=0, threads=None):
            trainers[i] = LocalTrainer(model, p, task, seed=seed)  # plan rank r: the device makes room for 2 r
            return trainers[i]

        outs[i] = join_device(port, str(minilm), plan, f"d{i}", train, factory, stepdown=False, holdout=holdout)

    cut = [int(0.75 * len(s)) for s in shards]
    run_devices(server, [(device, (i, s[:c], s[c:])) for i, (s, c) in enumerate(zip(shards, cut))])
    assert len(outs) == 3 and all(len(o["rounds"]) == 2 and all(x["accepted"] for x in o["rounds"])
                                  for o in outs.values())
    assert all(u["size"] > 0 for u in coord.store.updates(2))
    accs = [_accuracies(trainers[i], coord.global_state, coord.method, shards[i][cut[i]:], r) for i in range(3)]
    personal, glob = (sum(a[k] for a in accs) / 3 for k in (0, 1))
    reported = coord.store.rounds()[-1]["metrics"]  # what the devices reported, averaged by the coordinator
    assert reported["device_holdout_n"] == 3 and reported["device_holdout_accuracy"] == pytest.approx(personal)
    print(f"personalized {personal:.3f} vs global {glob:.3f} per device {accs}")
    assert personal > glob, accs
    coord.close()
