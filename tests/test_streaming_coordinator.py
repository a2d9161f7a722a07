"""Streaming round aggregation: the coordinator folds uploads as they arrive and gets the batch result.

The reference is the pure maths (`coordinator.aggregation`), not the round engine itself."""
import json
from dataclasses import replace

import pytest
import torch

from coordinator.aggregation import (DeviceState, GlobalState, LoraUpdate, aggregate_modules, factor_svd, fedavg,
                                     fedsa, stack, to_scale, validate_updates, zero_pad)
from coordinator.aggregation.svd import factors_from_svd, stacked_factors
from coordinator.defences import RoundUpload
from coordinator.engine import RoundEngine, aggregate
from coordinator.methods import NAMES, MethodConfig, make_method, method_class
from coordinator.round_policy import RoundPolicy
from coordinator.server_opt import ServerOptState
from coordinator.service import Coordinator, CoordinatorConfig
from protos import wire
from protos.adapter import A_SUFFIX, B_SUFFIX

torch.set_num_threads(1)
MODS = {"m0": (12, 10), "m1": (6, 8)}  # name -> (out, in)


def _global(cfg: MethodConfig) -> GlobalState:
    g = torch.Generator().manual_seed(1)
    mods = {n: LoraUpdate(A=torch.randn(cfg.max_rank, i, generator=g), B=torch.randn(o, cfg.max_rank, generator=g),
                          scale=1.0) for n, (o, i) in MODS.items()}
    return GlobalState(cfg.name, mods, {"head.weight": torch.randn(2, 4, generator=g)})


def _upload(rank: int, seed: int, with_b: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"head.weight": torch.randn(2, 4, generator=g)}
    for n, (o, i) in MODS.items():
        state[n + A_SUFFIX] = torch.randn(rank, i, generator=g)
        if with_b:
            state[n + B_SUFFIX] = torch.randn(o, rank, generator=g)
    return state


def _reference(name: str, g: GlobalState, uploads: list[RoundUpload], cfg: MethodConfig) -> GlobalState:
    """The next global written out from the definitions (no streaming, no recompression).

    Every device contributes its change from what a device of its rank is served (`Method.serve`):
    fixed-shape methods average A0 + pad(dA) and B0 + pad(dB * s_k / s) at the max-rank scale s;
    svd adds the average change of the products; stack appends this round's exact sum of products."""
    method = make_method(cfg)
    from coordinator.aggregation import split_state

    uploads = [replace(u, weight=u.weight * method.weight_factor(split_state(method.complete_upload(u.state, g))[0]))
               for u in uploads]  # the method's factor on each device's weight (hetlora: its product's norm)
    W = sum(u.weight for u in uploads)
    s = cfg.scale(cfg.max_rank)
    extra = {k: sum(u.weight * u.state[k].double() for u in uploads) / W for k in uploads[0].state
             if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))}
    mods = {}
    for n, G in g.modules.items():
        acc = {"A": 0, "B": 0, "D": 0, "P": 0}
        for u in uploads:
            A = u.state[n + A_SUFFIX].double()
            r, s_k = A.shape[0], cfg.scale(A.shape[0])
            B = u.state.get(n + B_SUFFIX, torch.zeros(G.shape[0], r)).double()
            served = method.serve(g, r, 0).adapter[n]
            A0 = served.A.double()
            B0 = torch.zeros_like(B) if served.B is None else served.B.double()
            dA, dB = torch.zeros_like(G.A, dtype=torch.float64), torch.zeros_like(G.B, dtype=torch.float64)
            dA[:r], dB[:, :r] = A - A0, (B - B0) * s_k / s
            acc["A"] = acc["A"] + u.weight * dA / W
            acc["B"] = acc["B"] + u.weight * dB / W
            acc["D"] = acc["D"] + u.weight * s_k * ((B @ A) - (B0 @ A0 if name == "svd" else 0)) / W
            YA, YB = G.A.double() + dA, G.B.double() * G.scale / s + dB  # the device's model on the global
            acc["P"] = acc["P"] + u.weight * s * (YB @ YA) / W
        GA, GB = G.A.double(), G.B.double() * G.scale / s
        if name == "svd":  # dense product: the global's plus the average change
            mods[n] = ("dense", G.scale * G.B.double() @ G.A.double() + acc["D"])
        elif name == "stack":
            mods[n] = ("dense", G.scale * G.B.double() @ G.A.double() + acc["D"])
        elif name == "fedsa":
            mods[n] = ("A", GA + acc["A"])
        elif name == "fedex":  # exactly the average of the devices' models
            mods[n] = ("dense", acc["P"])
        elif name in ("ffa", "rolora"):  # round 1 trains B: A stays the global's
            mods[n] = ("dense", s * (GB + acc["B"]) @ G.A.double())
        else:
            mods[n] = ("dense", s * (GB + acc["B"]) @ (GA + acc["A"]))
    return mods, extra, W


def _dense(g: GlobalState) -> dict[str, torch.Tensor]:
    """What the global adds to each weight: its adapter's product plus what it folds into the base."""
    out = {n: (u.B.double() * u.scale) @ u.A.double() for n, u in g.modules.items()}
    for n, b in g.base.items():
        out[n] = out[n] + (b.B.double() * b.scale) @ b.A.double()
    return out


def _assert_same(a: GlobalState, ref, tol: float = 1e-5) -> None:
    mods, extra, W = ref
    assert set(a.modules) == set(mods)
    da = _dense(a)
    for n, (kind, want) in mods.items():
        got = a.modules[n].A.double() if kind == "A" else da[n]
        assert torch.allclose(got, want, atol=tol, rtol=tol), (n, (got - want).abs().max())
    assert set(a.extra) == set(extra)
    for k in a.extra:
        assert torch.allclose(a.extra[k].double(), extra[k], atol=tol)
    assert a.total_weight == pytest.approx(W)


LORA_NAMES = [n for n in NAMES if method_class(n).peft == "lora"]
TENSOR_NAMES = [n for n in NAMES if method_class(n).peft != "lora"]  # prompt tuning, (IA)3, BitFit


@pytest.mark.parametrize("name", TENSOR_NAMES)
def test_fold_of_named_tensors_is_their_weighted_mean(name):
    """Non-LoRA PEFT types: the streaming fold and the batch aggregate both give the weighted mean of
    the uploaded tensors (every device uploads every tensor the global has)."""
    cfg = MethodConfig(name=name, max_rank=4, cap_rank=64)
    method = make_method(cfg)
    gen = torch.Generator().manual_seed(3)
    shapes = {"prompt.embedding": (16, 4), "ia3.l": (8,), "classifier.weight": (2, 4)}
    g = method.initial({k: torch.randn(*v, generator=gen) for k, v in shapes.items()})
    uploads = [(f"d{k}", {n: torch.randn(*v, generator=gen) for n, v in shapes.items()}, float(k + 1))
               for k in range(3)]
    fold = RoundEngine(method, g, 1, policy=RoundPolicy.plain())
    for d, st, w in uploads:
        fold.fold(d, st, w)
    got, _ = fold.close()
    batch = aggregate(method, g, uploads)
    for n in shapes:
        want = sum(w * st[n].double() for _, st, w in uploads) / sum(w for _, _, w in uploads)
        assert torch.allclose(got.extra[n].double(), want, atol=1e-5), n
        assert torch.allclose(batch.extra[n].double(), want, atol=1e-5), n
    assert got.modules == {} and got.total_weight == pytest.approx(6.0)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_fold_equals_batch_aggregate_for_every_method(name):
    cfg = MethodConfig(name=name, max_rank=4, cap_rank=64)
    method = make_method(cfg)
    g = _global(cfg)
    ranks = [4, 4, 4] if method.common_rank else [1, 4, 2]
    uploads = [RoundUpload(f"d{k}", _upload(r, k, with_b=method.shares_b or k != 1), float(k + 1))
               for k, r in enumerate(ranks)]
    fold = RoundEngine(method, g, 1, policy=RoundPolicy.plain())
    for u in uploads:
        fold.fold(u.device_id, u.state, u.weight)
    got, metrics = fold.close()
    ref = _reference(name, g, uploads, cfg)
    _assert_same(got, ref)
    _assert_same(aggregate(method, g, [(u.device_id, u.state, u.weight) for u in uploads]), ref)
    assert metrics["stream_rel_error"] == 0.0 and fold.count == 3
    with pytest.raises(ValueError, match="already folded"):
        fold.fold("d0", uploads[0].state, 1.0)


def test_fold_memory_is_independent_of_the_number_of_devices():
    for name in ("zero_pad", "stack"):
        cfg = MethodConfig(name=name, max_rank=4, cap_rank=8)
        sizes = []
        for n in (5, 40):
            fold = RoundEngine(make_method(cfg), _global(cfg), 1)
            for k in range(n):
                fold.fold(f"d{k}", _upload(1 + k % 4, k), 1.0)
            sizes.append(fold.nbytes())
        cap = 4 if name == "zero_pad" else 8  # float64 factors of at most the cap rank + the head's sum
        bound = sum((o + i) * cap * 8 for o, i in MODS.values()) * (2 if name == "zero_pad" else 1) + 2 * 4 * 8
        assert 0 < sizes[1] <= bound and sizes[0] <= bound, (name, sizes, bound)


def test_stack_rank_is_capped_and_the_error_is_reported():
    cfg = MethodConfig(name="stack", max_rank=4, cap_rank=6)
    g = _global(cfg)
    uploads = [RoundUpload(f"d{k}", _upload(4, k), 1.0) for k in range(5)]  # stacked rank 20 > cap 6
    fold = RoundEngine(make_method(cfg), g, 1, policy=RoundPolicy.plain())
    for u in uploads:
        fold.fold(u.device_id, u.state, u.weight)
    got, metrics = fold.close()
    assert all(u.rank <= 6 for u in got.modules.values())
    assert 0 < metrics["stream_rel_error"] < 1 and metrics["stream_rank"] <= 6
    exact = _reference("stack", g, uploads, MethodConfig(name="stack", max_rank=4, cap_rank=64))
    for n, d in _dense(got).items():  # the streamed sum stays a reasonable approximation of the exact one
        want = exact[0][n][1]
        rel = float((d - want).norm() / want.norm())
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
    assert c.publisher.fold is not None and c.publisher.fold.devices == set(devs[:2])  # folded on arrival
    g0 = c.global_state
    c.close()

    c = _coordinator(tmp_path, tiny_model)  # restart mid-round: the fold is rebuilt from the durable uploads
    assert c.publisher.fold is None
    _send(c, devs[2], 0.05)
    rid = c.global_round
    assert rid == 1, "the third upload closes round 1"
    stored = [RoundUpload(u.device_id, u.state, c.policy.weight(u.weight)) for u in c.publisher.stored_uploads(1)]
    batch = _reference(c.method.name, g0, stored, c.method.cfg)
    _assert_same(c.global_state, batch, tol=1e-4)
    # the benchmarks' path (tools/sim.py: a RoundEngine with the round policy, uploads accepted against
    # what each device downloaded) gives the coordinator's global for the same uploads
    bench = RoundEngine(c.method, g0, 1, policy=c.policy, opt_state=ServerOptState())
    for u in c.store.updates(1):
        state = c.stored_state(u)
        bench.accept(u["device_id"], state, float(u["num_examples"]), c.download_tensors(u["download_id"]), "lora")
    got = bench.close()[0]
    for n, m in got.modules.items():
        want = c.global_state.modules[n]
        assert float((m.B * m.scale @ m.A - want.B * want.scale @ want.A).abs().max()) <= 1e-6
    assert all(float((got.extra[k] - c.global_state.extra[k]).abs().max()) <= 1e-6 for k in got.extra)
    metrics = c.store.rounds()[0]["metrics"]
    assert metrics["uploads"] == 3 and "stream_rel_error" in metrics
    c.close()


@pytest.mark.parametrize("kind", ["avgm", "adam"])
def test_server_optimizer_moments_survive_a_restart(tmp_path, tiny_model, kind):
    from coordinator.server_opt import ServerOptConfig

    policy = RoundPolicy(server_opt=ServerOptConfig(kind, lr=0.5 if kind == "avgm" else 0.01, beta1=0.5))

    def coordinator():
        return Coordinator(CoordinatorConfig(model=str(tiny_model), store=str(tmp_path / "store"), strategy="zero_pad",
                                             rounds=3, min_devices=2, max_rank=4, policy=policy))

    c = coordinator()
    devs = [c.register("{}", json.dumps({"rank": r, "mode": "lora"}), "", f"dev{r}")["device_id"] for r in (2, 4)]
    g0 = c.global_state
    for d in devs:
        _send(c, d, 0.05)
    assert c.global_round == 1 and c.opt_state.m  # the round closed through the server optimizer
    u0, u1 = g0.modules, c.global_state.modules
    n = next(iter(u0))
    moved = float((u1[n].A - u0[n].A).norm())
    assert moved > 0
    saved = {k: v.clone() for k, v in c.opt_state.m.items()}
    c.close()
    c = coordinator()  # resumed: the moments of round 1 come back with its global
    assert set(c.opt_state.m) == set(saved) and all(torch.equal(c.opt_state.m[k], saved[k]) for k in saved)
    assert c.store.get_meta("server_opt")["round_id"] == 1
    c.close()
