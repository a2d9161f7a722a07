"""Streaming round aggregation: the coordinator folds uploads as they arrive and gets the batch result."""
import json

import pytest
import torch

from coordinator import strategy as S
from coordinator.aggregation import GlobalState, LoraUpdate
from coordinator.round_fold import RoundFold
from coordinator.service import Coordinator, CoordinatorConfig
from protos import wire

torch.set_num_threads(1)
MODS = {"m0": (12, 10), "m1": (6, 8)}  # name -> (out, in)


def _global(cfg: S.StrategyConfig) -> GlobalState:
    g = torch.Generator().manual_seed(1)
    mods = {n: LoraUpdate(A=torch.randn(cfg.max_rank, i, generator=g), B=torch.randn(o, cfg.max_rank, generator=g),
                          scale=1.0) for n, (o, i) in MODS.items()}
    return GlobalState(cfg.name, mods, {"head.weight": torch.randn(2, 4, generator=g)})


def _upload(rank: int, seed: int, with_b: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"head.weight": torch.randn(2, 4, generator=g)}
    for n, (o, i) in MODS.items():
        state[n + S.A_SUFFIX] = torch.randn(rank, i, generator=g)
        if with_b:
            state[n + S.B_SUFFIX] = torch.randn(o, rank, generator=g)
    return state


def _dense(g: GlobalState) -> dict[str, torch.Tensor]:
    return {n: (u.B.double() * u.scale) @ u.A.double() for n, u in g.modules.items()}


def _assert_same(a: GlobalState, b: GlobalState, tol: float = 1e-5) -> None:
    assert a.strategy == b.strategy and set(a.modules) == set(b.modules)
    da, db = _dense(a), _dense(b)
    for n in da:
        assert torch.allclose(da[n], db[n], atol=tol, rtol=tol), (n, (da[n] - db[n]).abs().max())
    if a.strategy == "fedsa":
        for n in a.modules:
            assert torch.allclose(a.modules[n].A, b.modules[n].A, atol=tol)
    for k in a.extra:
        assert torch.allclose(a.extra[k], b.extra[k], atol=tol)
    assert a.total_weight == pytest.approx(b.total_weight)


@pytest.mark.parametrize("name", S.STRATEGIES)
def test_fold_equals_batch_aggregate_for_every_strategy(name):
    cfg = S.StrategyConfig(name=name, max_rank=4, cap_rank=64)
    g = _global(cfg)
    ranks = [4, 4, 4] if name in ("fedavg", "zo") else [1, 4, 2]
    uploads = [S.RoundUpload(f"d{k}", _upload(r, k, with_b=name != "fedsa" or k != 1), float(k + 1))
               for k, r in enumerate(ranks)]
    fold = RoundFold(1, g, cfg)
    for u in uploads:
        fold.add(u.device_id, u.state, u.weight)
    got, metrics = fold.result(g)
    _assert_same(got, S.aggregate_round(g, uploads, cfg))
    assert metrics["stream_rel_error"] == 0.0 and fold.count == 3
    with pytest.raises(ValueError, match="already folded"):
        fold.add("d0", uploads[0].state, 1.0)


def test_fold_memory_is_independent_of_the_number_of_devices():
    for name in ("zero_pad", "stack"):
        cfg = S.StrategyConfig(name=name, max_rank=4, cap_rank=8)
        sizes = []
        for n in (5, 40):
            fold = RoundFold(1, _global(cfg), cfg)
            for k in range(n):
                fold.add(f"d{k}", _upload(1 + k % 4, k), 1.0)
            sizes.append(fold.nbytes())
        cap = 4 if name == "zero_pad" else 8  # float64 factors of at most the cap rank + the head's sum
        bound = sum((o + i) * cap * 8 for o, i in MODS.values()) * (2 if name == "zero_pad" else 1) + 2 * 4 * 8
        assert 0 < sizes[1] <= bound and sizes[0] <= bound, (name, sizes, bound)


def test_stack_rank_is_capped_and_the_error_is_reported():
    cfg = S.StrategyConfig(name="stack", max_rank=4, cap_rank=6)
    g = _global(cfg)
    uploads = [S.RoundUpload(f"d{k}", _upload(4, k), 1.0) for k in range(5)]  # stacked rank 20 > cap 6
    fold = RoundFold(1, g, cfg)
    for u in uploads:
        fold.add(u.device_id, u.state, u.weight)
    got, metrics = fold.result(g)
    assert all(u.rank <= 6 for u in got.modules.values())
    assert 0 < metrics["stream_rel_error"] < 1 and metrics["stream_rank"] <= 6
    exact = S.aggregate_round(g, uploads, S.StrategyConfig(name="stack", max_rank=4, cap_rank=64))
    for n, d in _dense(got).items():  # the streamed sum stays a reasonable approximation of the exact one
        rel = float((d - _dense(exact)[n]).norm() / _dense(exact)[n].norm())
        assert rel < 1.0


def _coordinator(tmp_path, model, strategy="svd"):
    return Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "store"), strategy=strategy, rounds=2,
                                         min_devices=3, max_rank=4, norm_bound=1e4))


def _send(c: Coordinator, dev: str, scale: float) -> None:
    t = c.get_task(dev)
    assert t["state"] == "TRAIN", t
    state = wire.decode_tensors(c.download(dev, t["round_id"], t["download_id"]))[0]
    g = torch.Generator().manual_seed(hash(dev) % 1000)
    data = wire.encode_tensors({k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()},
                               {"precision": "fp32"})
    c.upload_append(dev, "u1", 0, data, len(data))
    header = {"upload_id": "u1", "round_id": t["round_id"], "nonce": t["nonce"], "total_size": len(data),
              "sha256": wire.sha256_hex(data), "stats": {"num_examples": 3 + len(dev) % 3}}
    c.finish_upload(dev, header, len(data))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("m") / "bert", hidden=32, vocab_size=300)


def test_coordinator_streams_and_survives_a_restart(tmp_path, tiny_model):
    c = _coordinator(tmp_path, tiny_model)
    devs = [c.register("{}", json.dumps({"rank": r, "mode": "lora"}), "", f"dev{r}")["device_id"] for r in (2, 4, 3)]
    _send(c, devs[0], 0.05)
    _send(c, devs[1], 0.05)
    assert c._fold is not None and c._fold.devices == set(devs[:2])  # folded on arrival
    g0 = c.global_state
    c.close()

    c = _coordinator(tmp_path, tiny_model)  # restart mid-round: the fold is rebuilt from the durable uploads
    assert c._fold is None
    _send(c, devs[2], 0.05)
    rid = c.global_round
    assert rid == 1, "the third upload closes round 1"
    batch = S.aggregate_round(g0, list(c._stored_uploads(1)), c.scfg)
    _assert_same(c.global_state, batch, tol=1e-4)
    metrics = c.store.rounds()[0]["metrics"]
    assert metrics["uploads"] == 3 and "stream_rel_error" in metrics
    c.close()
