"""FeDeRA's SVD initialisation (`--init federa`): the factor maths, the initial model left unchanged
by the residual base, clear errors, and a federation over real gRPC that starts from it."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from coordinator.aggregation.svd_init import svd_init_factors
from coordinator.engine import RoundEngine
from coordinator.init_global import initial_global
from coordinator.methods import MethodConfig, make_method
from tests.waiting import join_device, run_devices
from protos.adapter import A_SUFFIX, B_SUFFIX
from protos.wire import BASE_DELTA, split_download

INIT = "federa"


def test_svd_init_factors_give_the_best_rank_r_part():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 7, generator=g, dtype=torch.float64)
    A, B = svd_init_factors(W, 3, 2.0)
    assert A.shape == (3, 7) and B.shape == (10, 3)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    assert torch.allclose(2.0 * B.double() @ A.double(), best, atol=1e-5)
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-5)  # singular values split evenly
    with pytest.raises(ValueError, match="rank 8 must be in"):
        svd_init_factors(W, 8, 2.0)


def test_init_is_validated_and_refused_where_no_base_is_served():
    with pytest.raises(ValueError, match="--init / init 'pissa'"):
        MethodConfig("fedavg", max_rank=4, init="pissa")
    with pytest.raises(ValueError, match="--init federa: strategy 'svd'"):
        make_method(MethodConfig("svd", max_rank=4, init=INIT))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("federa") / "bert", hidden=32, vocab_size=500)


def _setup(bert, name: str = "fedavg", rank: int = 4):
    from coordinator.model import initial_adapter_state, load_base_model, resolve_target_modules

    model, tok = load_base_model(str(bert), "classification", 2, 0)
    targets = resolve_target_modules(model, ["query", "value"])
    init = initial_adapter_state(model, targets, rank, 16.0, False, 0)
    method = make_method(MethodConfig(name, max_rank=rank, init=INIT))
    return model, tok, method, initial_global(method, init, model.state_dict())


def test_the_initial_model_is_unchanged(bert):
    """The adapter starts at the principal part (non-zero B) and the residual base cancels it: the
    global's predictions equal the base model's."""
    from coordinator.model import Evaluator
    from edge_runtime.data import load_sst2

    model, tok, method, g = _setup(bert)
    assert g.base and all(float(u.B.abs().max()) > 0 for u in g.modules.values())
    ev = Evaluator(model, tok, load_sst2("dev", limit=32), task="classification")
    plain, federa = ev.evaluate({}, g.extra), ev.evaluate(method.deltas(g), g.extra)
    assert federa["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    sent = RoundEngine(method, g, 1).download(4, "lora", 0)  # every device merges the residual
    assert any(k.startswith(BASE_DELTA) for k in sent)


def test_federation_starts_from_the_svd_init_over_grpc(bert, tmp_path):
    """A coordinator with --init federa and two emulated devices on 127.0.0.1: the devices merge the
    residual into their bases and train from the SVD factors; both rounds aggregate, the global
    keeps the residual, and its held-out loss is finite and evaluated every round."""
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan

    torch.set_num_threads(1)
    recs = load_sst2("train", limit=128)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=32)))
    coord = Coordinator(CoordinatorConfig(model=str(bert), store=str(tmp_path / "store"), strategy="fedavg",
                                          rounds=2, min_devices=2, local_steps=4, lr=1e-3, max_rank=4, init=INIT,
                                          eval_data=str(ev), round_timeout_s=120, poll_interval_s=0.2))
    assert coord.global_state.base, "the initial global should carry the residual base"
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=8, seq_len=32, learning_rate=1e-3)
    outs: dict[str, dict] = {}

    def device(name: str, shard: list[dict]) -> None:
        outs[name] = join_device(port, str(bert), replace(plan), name, shard)

    run_devices(server, [(device, (f"d{i}", recs[i::2])) for i in range(2)])
    assert set(outs) == {"d0", "d1"}, "a device did not finish"
    assert all(r["accepted"] for o in outs.values() for r in o["rounds"]) and all(len(o["rounds"]) == 2
                                                                                  for o in outs.values())
    assert coord.fed.current.state == "aggregated" and coord.global_state.base
    s = coord.method.cfg.scale(4)
    for u in coord.store.updates(1):  # what went over the wire: SVD factors + the residual cancelling them
        state, delta = split_download(coord.download_tensors(u["download_id"]))
        assert delta
        for mod, (B, A) in delta.items():
            principal = B.double() @ A.double()
            net = s * state[mod + B_SUFFIX].double() @ state[mod + A_SUFFIX].double() + principal
            assert float(principal.abs().max()) > 0 and float(net.abs().max()) < 1e-4 * float(principal.abs().max())
    losses = [r["metrics"] for r in coord.store.rounds()]
    assert len(losses) == 2 and all(0 < m["loss"] < 10 for m in losses), losses
    coord.close()
