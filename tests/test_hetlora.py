"""HetLoRA rank self-pruning: the slot-share maths, the coordinator accepting a lower rank only for
the method that allows it, the fold of a pruned upload, and a federation over real gRPC where
devices prune after round 1 and train and send less from round 2 on."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from coordinator.engine import RoundEngine
from coordinator.methods import MethodConfig, make_method
from coordinator.validation import UpdateInvalid
from edge_runtime.training.prune import lora_scale, prune_state, pruned_rank, tail_shares
from tests.waiting import join_device, run_devices
from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract

NAME = "hetlora"
M = "base_model.model.layer.q"


def _slots(norms: list[float], d_in: int = 12, d_out: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) with orthonormal rows and B (out, r) with orthogonal columns of the given norms,
    so that slot i carries exactly norms[i] of the product's singular values."""
    g = torch.Generator().manual_seed(0)
    qa, _ = torch.linalg.qr(torch.randn(d_in, len(norms), generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(d_out, len(norms), generator=g, dtype=torch.float64))
    return qa.T.float(), (qb * torch.tensor(norms, dtype=torch.float64)).float()


def test_tail_shares_and_pruned_rank():
    A, B = _slots([4.0, 2.0, 0.5, 0.1])
    shares = tail_shares(A, B)
    total = (16 + 4 + 0.25 + 0.01) ** 0.5
    assert shares[0] == pytest.approx(1.0)
    assert shares[2] == pytest.approx((0.25 + 0.01) ** 0.5 / total, rel=1e-5)
    assert shares[4] == 0.0
    state = {M + A_SUFFIX: A, M + B_SUFFIX: B, "head.weight": torch.ones(2, 3)}
    assert pruned_rank(state, 0.0) == 4  # off
    assert pruned_rank(state, 0.03) == 3  # only the 0.1 slot is small enough
    assert pruned_rank(state, 0.2) == 2
    assert pruned_rank(state, 0.001) == 4
    # the worst module decides: a second module whose slots are all equal keeps the rank
    A2, B2 = _slots([1.0, 1.0, 1.0, 1.0])
    assert pruned_rank({**state, "x" + A_SUFFIX: A2, "x" + B_SUFFIX: B2}, 0.2) == 4
    with pytest.raises(ValueError, match="no LoRA modules"):
        pruned_rank({"head.weight": torch.ones(2)}, 0.5)


def test_prune_state_keeps_the_kept_slots_product():
    A, B = _slots([3.0, 1.0, 0.2, 0.1])
    s4, s2 = lora_scale(16.0, 4, False), lora_scale(16.0, 2, False)
    out = prune_state({M + A_SUFFIX: A, M + B_SUFFIX: B}, 2, s4, s2)
    assert out[M + A_SUFFIX].shape == (2, 12) and out[M + B_SUFFIX].shape == (10, 2)
    assert torch.allclose(s2 * out[M + B_SUFFIX] @ out[M + A_SUFFIX], s4 * B[:, :2] @ A[:2], atol=1e-5)


def test_contract_carries_the_threshold_and_bad_values_are_named():
    c = DeviceContract(prune_threshold=0.25)
    assert DeviceContract.from_meta({"device_contract": c.to_meta()}) == c
    with pytest.raises(ValueError, match="prune_threshold"):
        DeviceContract(prune_threshold=1.5)
    with pytest.raises(ValueError, match="--prune-threshold"):
        MethodConfig(NAME, max_rank=4, prune_threshold=-0.1)
    with pytest.raises(ValueError, match="--prune-threshold 0.3: strategy 'zero_pad'.*" + NAME):
        make_method(MethodConfig("zero_pad", max_rank=4, prune_threshold=0.3))


def _global(method, R: int = 8):
    g = torch.Generator().manual_seed(1)
    init = {M + A_SUFFIX: torch.randn(R, 12, generator=g), M + B_SUFFIX: torch.randn(10, R, generator=g) * 0.1,
            "head.weight": torch.zeros(2, 3)}
    return method.initial(init)


def test_lower_rank_upload_is_accepted_only_when_the_method_prunes():
    het = make_method(MethodConfig(NAME, max_rank=8, prune_threshold=0.3))
    pad = make_method(MethodConfig("zero_pad", max_rank=8))
    for method, ok in ((het, True), (pad, False)):
        eng = RoundEngine(method, _global(method), 1)
        sent = eng.download(8, "lora", 0)
        up = prune_state(sent, 3, 2.0, 16.0 / 3)
        if ok:
            eng.accept("d", up, 10, sent, "lora")
        else:
            with pytest.raises(UpdateInvalid, match=r"expected \(3, 12\)|expected \(8, 12\)"):
                eng.accept("d", up, 10, sent, "lora")
    eng = RoundEngine(het, _global(het), 1)
    sent = eng.download(4, "lora", 0)
    bigger = {k: (torch.zeros(6, 12) if k.endswith(A_SUFFIX) else torch.zeros(10, 6) if k.endswith(B_SUFFIX) else v)
              for k, v in sent.items()}
    with pytest.raises(UpdateInvalid, match=r"expected \(4, 12\)"):  # never above the served rank
        eng.validate(bigger, sent, "lora")
    off = make_method(MethodConfig(NAME, max_rank=8))  # threshold 0: devices were not told to prune
    eng = RoundEngine(off, _global(off), 1)
    sent = eng.download(8, "lora", 0)
    with pytest.raises(UpdateInvalid, match="shape"):
        eng.validate(prune_state(sent, 3, 2.0, 16.0 / 3), sent, "lora")


def test_a_pruned_upload_moves_only_its_kept_slots():
    """A device that pruned to rank 3 without changing its kept slots leaves the global unchanged; a
    change to a kept slot of B arrives at the max-rank scale."""
    het = make_method(MethodConfig(NAME, max_rank=8, prune_threshold=0.3))
    g = _global(het)
    eng = RoundEngine(het, g, 1)
    sent = eng.download(8, "lora", 0)
    s8, s3 = het.cfg.scale(8), het.cfg.scale(3)
    up = prune_state(sent, 3, s8, s3)
    eng.fold("a", up, 5, sent=sent)
    new, _ = eng.close()
    assert torch.allclose(new.modules[M].A, g.modules[M].A) and torch.allclose(new.modules[M].B, g.modules[M].B,
                                                                                atol=1e-6)
    eng = RoundEngine(het, g, 1)
    up2 = dict(up)
    up2[M + B_SUFFIX] = up[M + B_SUFFIX] + torch.ones(10, 3) / s3  # + 1 in s B A-units on the kept slots
    eng.fold("a", up2, 5, sent=sent)
    new, _ = eng.close()
    dB = new.modules[M].B * new.modules[M].scale - g.modules[M].B * g.modules[M].scale
    assert torch.allclose(dB[:, :3], torch.ones(10, 3), atol=1e-5) and dB[:, 3:].abs().max() < 1e-6


# -- end to end over gRPC -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("het") / "bert", hidden=32, vocab_size=500)


def test_devices_prune_over_grpc_and_send_less(bert, tmp_path):
    """Two emulated devices (plan rank 8 and 4) against a real coordinator on 127.0.0.1: after round
    1 each uploads at a pruned rank, which the coordinator accepts and assigns from round 2 on; the
    round-2 downloads and uploads are smaller and every round is aggregated."""
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan

    torch.set_num_threads(1)
    recs = load_sst2("train", limit=128)
    coord = Coordinator(CoordinatorConfig(model=str(bert), store=str(tmp_path / "store"), strategy=NAME, rounds=3,
                                          min_devices=2, local_steps=4, lr=1e-2, max_rank=8, prune_threshold=0.75,
                                          round_timeout_s=120, poll_interval_s=0.2))
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    base = Plan(rank=8, target_modules=["query", "value"], batch_size=8, seq_len=32, learning_rate=1e-2)
    outs: dict[str, dict] = {}

    def device(name: str, rank: int, shard: list[dict]) -> None:
        outs[name] = join_device(port, str(bert), replace(base, rank=rank), name, shard)

    run_devices(server, [(device, (n, r, recs[i::2])) for i, (n, r) in enumerate((("big", 8), ("small", 4)))])
    assert set(outs) == {"big", "small"}, "a device did not finish"
    for name, first in (("big", 8), ("small", 4)):
        rounds = outs[name]["rounds"]
        assert len(rounds) == 3 and all(r["accepted"] for r in rounds)
        assert rounds[0]["rank"] == first and rounds[0].get("pruned_rank", first) < first, rounds[0]
        assert rounds[1]["rank"] == rounds[0]["pruned_rank"], "the coordinator should assign the pruned rank"
        assert rounds[1]["download_bytes"] < rounds[0]["download_bytes"]
        assert rounds[1]["upload_bytes"] <= rounds[0]["upload_bytes"]
    ups = coord.store.updates(1)
    assert all(json.loads(u["stats"]["extra_json"])["pruned_rank"] >= 1 for u in ups)
    assert coord.fed.current.state == "aggregated" and coord.fed.current.round_id == 3
    coord.close()


def test_sparsity_weighted_aggregation_weights_by_the_product_norm():
    """Two devices with the same examples: the fold weights each by ||s B A||_F of its upload."""
    from coordinator.methods.hetlora import product_norm
    from coordinator.round_policy import RoundPolicy

    het = make_method(MethodConfig(NAME, max_rank=4))
    g = _global(het, 4)
    eng = RoundEngine(het, g, 1, policy=RoundPolicy.plain())
    sent = eng.download(4, "lora", 0)
    ups, norms = [], []
    for k, c in enumerate((1.0, 3.0)):
        up = dict(sent)
        up[M + A_SUFFIX] = sent[M + A_SUFFIX] + c  # a change of c in every entry of A
        up[M + B_SUFFIX] = sent[M + B_SUFFIX] * c
        ups.append(up)
        norms.append(product_norm({M: (up[M + A_SUFFIX], up[M + B_SUFFIX])}, het.cfg.scale(4)))
        eng.fold(f"d{k}", up, 10, sent=sent)
    new, _ = eng.close()
    want = g.modules[M].A + (norms[0] * 1.0 + norms[1] * 3.0) / (norms[0] + norms[1])
    assert norms[1] > 2 * norms[0]
    assert torch.allclose(new.modules[M].A, want, atol=1e-5)
    assert het.weight_factor({M: (torch.zeros(4, 12), torch.zeros(10, 4))}) > 0  # an all-zero upload still counts
