"""Secure aggregation: masked sums equal plain sums, dropouts, thresholds, no stored individual input, tampering."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from coordinator.aggregation import zero_pad
from coordinator.aggregation.state import DeviceState, aggregate_modules
from coordinator.aggregation.types import lora_scale
from coordinator.methods import NAMES
from coordinator.secagg_round import check_method_supports_secagg
from coordinator.secagg_server import SecAggServer
from edge_runtime.secagg_client import SecAggClient
from protos.secagg import (AdvertiseKeys, EncryptedShare, KeyDirectory, MaskedInput, RoutedShares, SecAggAbort,
                           SecAggError, SecAggParams, ShareKeys, UnmaskRequest, UnmaskShares, encode_fixed,
                           make_params, neighbour_graph)
from protos.secagg_payload import PayloadLayout, pack_state, unpack_average, zo_pack, zo_unpack
from protos.zo import perturbation, replay

HIDDEN, LAYERS, ALPHA = 384, 6, 16.0  # all-MiniLM-L6-v2 shapes
MODULES = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}" for i in range(LAYERS) for m in ("query", "value")]


def lora_state(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """peft-keyed adapter state: A (r, 384), B (384, r) per module + a 2-class head."""
    g = torch.Generator().manual_seed(seed)
    st = {}
    for m in MODULES:
        st[m + ".lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g) * 0.05
        st[m + ".lora_B.weight"] = torch.randn(HIDDEN, rank, generator=g) * 0.02
    st["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(2, HIDDEN, generator=g) * 0.1
    st["base_model.model.classifier.modules_to_save.default.bias"] = torch.randn(2, generator=g) * 0.1
    return st


def wire(msg):
    """Every message crosses the 'network' as bytes."""
    return type(msg).from_bytes(msg.to_bytes())


def run_round(inputs: dict[str, np.ndarray], threshold: int, *, no_share=(), no_input=(), no_unmask=(),
              neighbours=None, tamper=None, keep=None):
    """Drive one round; devices in no_* drop before that step. Returns (server, result)."""
    ids = sorted(inputs)
    L = len(next(iter(inputs.values())))
    srv = SecAggServer(ids, threshold, L, round_id=7, neighbours=neighbours)
    clients = {d: SecAggClient(d) for d in ids}
    params = wire(srv.params)
    for d in ids:
        srv.receive_advertise(wire(clients[d].advertise_keys(params)))
    directory = wire(srv.close_advertise())
    for d in ids:
        if d not in no_share:
            srv.receive_share_keys(wire(clients[d].share_keys(directory)))
    routed = {d: wire(r) for d, r in srv.close_share_keys().items()}
    if tamper:
        routed = tamper(routed)
    for d in routed:
        if d not in no_input:
            srv.receive_masked_input(wire(clients[d].masked_input(routed[d], inputs[d])))
    request = wire(srv.close_masked_input())
    for d in request.survivors:
        if d not in no_unmask:
            srv.receive_unmask(wire(clients[d].unmask(request)))
    if keep is not None:
        keep.append(pickle.dumps(srv))
    return srv, srv.finish()


def random_inputs(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"dev{i}": rng.normal(0, 0.1, length) for i in range(n)}


def test_masked_sum_equals_plain_zero_pad_sum_on_lora_shapes():
    ranks, examples = [2, 4, 8, 4, 8], [120, 80, 200, 50, 150]
    cap = max(examples)
    states = [lora_state(r, seed=i) for i, r in enumerate(ranks)]
    layout = PayloadLayout.from_state(lora_state(max(ranks), seed=99))  # global shapes at the largest rank
    inputs = {f"dev{i}": pack_state(st, layout, weight=n / cap, b_scale=lora_scale(ALPHA, r))
              for i, (st, r, n) in enumerate(zip(states, ranks, examples))}
    _, res = run_round(inputs, threshold=3)
    plain = sum(inputs.values())
    err = float(np.abs(res.total - plain).max())
    print(f"vector_len={layout.vector_len} max |secagg - plain| = {err:.3e} (5 devices)")
    assert err < 5 * 2.0 ** -20 and res.dropped == ()
    avg, weight = unpack_average(res.total, layout)
    ref = aggregate_modules([DeviceState(st, ALPHA, False, n / cap) for st, n in zip(states, examples)],
                            lambda ups: zero_pad(ups, max(ranks)))
    assert abs(weight - sum(examples) / cap) < 1e-5
    for m, upd in ref.modules.items():
        assert upd.scale == 1.0  # scales differ, so both fold s_k into B
        torch.testing.assert_close(avg[m + ".lora_A.weight"], upd.A, atol=1e-5, rtol=0)
        torch.testing.assert_close(avg[m + ".lora_B.weight"], upd.B, atol=1e-5, rtol=0)
    for k, v in ref.extra.items():
        torch.testing.assert_close(avg[k], v, atol=1e-5, rtol=0)


def test_fedsa_payload_shares_only_A():
    states = [lora_state(4, seed=i) for i in range(4)]
    layout = PayloadLayout.from_state(states[0], only=[".lora_A.weight"])
    assert not any(k.endswith(".lora_B.weight") for k, _ in layout.entries)
    inputs = {f"dev{i}": pack_state(st, layout, weight=1.0, ignore_extra=True) for i, st in enumerate(states)}
    _, res = run_round(inputs, threshold=2)
    avg, _ = unpack_average(res.total, layout)
    m = MODULES[0] + ".lora_A.weight"
    torch.testing.assert_close(avg[m], sum(st[m] for st in states) / 4, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="outside the payload layout"):
        pack_state(states[0], layout, weight=1.0)


def test_zo_seed_scalars_sum_replays_to_weighted_average():
    pool = list(range(1000, 1016))
    shapes = {"lora_A": (4, 8), "lora_B": (8, 4)}
    start = {k: torch.randn(s, generator=torch.Generator().manual_seed(1)) for k, s in shapes.items()}
    rng = np.random.default_rng(3)
    pairs = [[(int(s), float(rng.normal())) for s in rng.choice(pool, 5)] for _ in range(3)]
    weights, lr = [0.5, 1.0, 0.25], 0.01
    inputs = {f"dev{i}": zo_pack(p, pool, weight=w) for i, (p, w) in enumerate(zip(pairs, weights))}
    _, res = run_round(inputs, threshold=2)
    avg_pairs, W = zo_unpack(res.total, pool)
    got = replay(start, avg_pairs, lr)
    finals = [replay(start, p, lr) for p in pairs]
    for k in shapes:
        want = sum(w * f[k] for w, f in zip(weights, finals)) / sum(weights)
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=0)
    assert perturbation(1000, shapes)["lora_A"].shape == (4, 8)
    with pytest.raises(ValueError, match="seed pool"):
        zo_pack([(5, 1.0)], pool, weight=1.0)


def test_dropout_after_masked_input_still_completes():
    inputs = random_inputs(5, 2000)
    _, res = run_round(inputs, threshold=3, no_unmask={"dev2"})
    assert res.survivors == tuple(sorted(inputs)) and res.dropped == ()
    assert np.abs(res.total - sum(inputs.values())).max() < 1e-6  # dev2's input counts: it arrived


def test_dropout_before_masked_input_is_excluded():
    inputs = random_inputs(5, 2000, seed=1)
    _, res = run_round(inputs, threshold=3, no_input={"dev1"})
    assert res.dropped == ("dev1",) and "dev1" not in res.survivors
    survivors_sum = sum(v for d, v in inputs.items() if d != "dev1")
    print(f"dropout before input: max error {np.abs(res.total - survivors_sum).max():.3e}")
    assert np.abs(res.total - survivors_sum).max() < 1e-6


def test_dropout_before_sharing_keys_is_excluded():
    inputs = random_inputs(5, 500, seed=2)
    _, res = run_round(inputs, threshold=3, no_share={"dev4"}, no_input={"dev0"})
    assert res.dropped == ("dev0", "dev4")
    assert np.abs(res.total - sum(inputs[d] for d in ("dev1", "dev2", "dev3"))).max() < 1e-6


def test_secagg_plus_sparse_graph_with_dropout():
    inputs = random_inputs(9, 1000, seed=4)
    graph = neighbour_graph(sorted(inputs), 4, seed=11)
    assert all(len(v) == 4 and all(d in graph[u] for u in v) for d, v in graph.items())  # 4-regular, symmetric
    _, res = run_round(inputs, threshold=3, neighbours=4, no_input={"dev5"}, no_unmask={"dev7"})
    assert np.abs(res.total - sum(v for d, v in inputs.items() if d != "dev5")).max() < 1e-6


def test_fewer_than_threshold_survivors_is_a_clear_error():
    inputs = random_inputs(5, 100, seed=5)
    with pytest.raises(SecAggAbort, match="only 2 of 5 devices sent masked inputs; the threshold is 3"):
        run_round(inputs, threshold=3, no_input={"dev0", "dev1", "dev2"})
    with pytest.raises(SecAggAbort, match="answered the unmasking request"):
        run_round(inputs, threshold=4, no_unmask={"dev0", "dev1"})
    with pytest.raises(ValueError, match="threshold must be in"):
        SecAggServer(["a", "b", "c"], 1, 10)


def _arrays_in(obj, seen=None):
    """Every numpy array / bytes / tensor reachable from obj's attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (np.ndarray, bytes, torch.Tensor)):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _arrays_in(k, seen)
            yield from _arrays_in(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _arrays_in(v, seen)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _arrays_in(v, seen)


def _decodings(a, length: int, scale_bits: int):
    if isinstance(a, torch.Tensor):
        a = a.numpy()
    if isinstance(a, np.ndarray):
        a = a.tobytes() if a.dtype in (np.uint32, np.int32) else a
    if isinstance(a, np.ndarray):
        yield a.astype(np.float64).reshape(-1)
    elif len(a) >= 4 * length:
        for dt in ("<i4", "<f4"):
            with np.errstate(all="ignore"):
                v = np.frombuffer(a[: len(a) - len(a) % 4], dtype=dt).astype(np.float64)
            yield v / (2.0 ** scale_bits if dt == "<i4" else 1.0)
        if len(a) >= 8 * length:
            yield np.frombuffer(a[: len(a) - len(a) % 8], dtype="<f8")


def _stored_inputs(state, inputs, length: int, scale_bits: int) -> tuple[list[str], int]:
    """(devices whose input is found in state's arrays, number of candidate vectors checked)."""
    found, checked = [], 0
    for blob in _arrays_in(state):
        for v in _decodings(blob, length, scale_bits):
            if v.shape[0] < length:
                continue
            checked += 1
            found += [d for d, x in inputs.items() if np.allclose(v[:length], x, atol=1e-3)]
    return found, checked


def test_server_never_stores_an_individual_unmasked_input():
    inputs = random_inputs(5, 3000, seed=6)
    snapshots: list[bytes] = []
    srv, res = run_round(inputs, threshold=3, no_input={"dev3"}, keep=snapshots)
    p = srv.params
    for when, state in (("before finish", pickle.loads(snapshots[0])), ("after finish", srv)):
        found, checked = _stored_inputs(state, inputs, p.vector_len, p.scale_bits)
        assert found == [], f"server state {when} holds the unmasked input of {found}"
        assert checked >= 1 or when == "after finish"  # before finish it holds the masked sum
    leaky = pickle.loads(snapshots[0])  # the detector does fire on a server that keeps an input
    leaky._debug = {"last": encode_fixed(inputs["dev1"], p.clip, p.scale_bits)[0]}
    assert _stored_inputs(leaky, inputs, p.vector_len, p.scale_bits)[0] == ["dev1"]
    for d, x in inputs.items():  # the exact fixed-point encoding of no input appears in the pickled state
        enc = encode_fixed(x, p.clip, p.scale_bits)[0].astype("<u4").tobytes()
        assert enc[:64] not in snapshots[0] and enc[:64] not in pickle.dumps(srv)
    assert np.abs(res.total - sum(v for d, v in inputs.items() if d != "dev3")).max() < 1e-6


def test_tampered_or_misrouted_ciphertext_is_rejected():
    inputs = random_inputs(4, 50, seed=7)

    def flip(routed):
        s = routed["dev0"].shares[0]
        bad = dataclasses.replace(s, ciphertext=bytes([s.ciphertext[0] ^ 1]) + s.ciphertext[1:])
        return {**routed, "dev0": dataclasses.replace(routed["dev0"], shares=(bad,) + routed["dev0"].shares[1:])}

    with pytest.raises(SecAggError, match="failed authentication"):
        run_round(inputs, threshold=2, tamper=flip)

    def reroute(routed):  # dev1's share for dev2 relabelled as a share for dev0
        s12 = next(s for s in routed["dev2"].shares if s.sender == "dev1")
        fake = dataclasses.replace(s12, recipient="dev0")
        shares = tuple(fake if s.sender == "dev1" else s for s in routed["dev0"].shares)
        return {**routed, "dev0": dataclasses.replace(routed["dev0"], shares=shares)}

    with pytest.raises(SecAggError, match="failed authentication"):
        run_round(inputs, threshold=2, tamper=reroute)


def test_method_gate():
    assert set(NAMES) == {"fedavg", "zero_pad", "fedsa", "zo", "stack", "svd", "ffa", "rolora", "fedex", "hetlora",
                          "feddpa", "prompt_tuning", "ia3", "bitfit", "adapter"}
    for ok in ("fedavg", "zero_pad", "fedsa", "zo", "ffa", "rolora", "feddpa", "prompt_tuning", "ia3", "bitfit",
               "adapter"):
        check_method_supports_secagg(ok)
    with pytest.raises(ValueError, match="cannot run under secure aggregation: .*prune their rank"):
        check_method_supports_secagg("hetlora")
    for bad in ("stack", "svd", "fedex"):
        with pytest.raises(ValueError, match="cannot run under secure aggregation: .*(individual|per-device products|"
                                             "product B_k A_k)"):
            check_method_supports_secagg(bad)
    with pytest.raises(ValueError, match="unknown method 'krum'"):
        check_method_supports_secagg("krum")


def test_fixed_point_range_and_clipping():
    p = make_params([f"d{i}" for i in range(5)], 3, 4, clip=8.0)
    assert 5 * (8.0 * 2 ** p.scale_bits + 1) < 2 ** 31
    with pytest.raises(ValueError, match="fixed-point overflow"):
        make_params(["a", "b", "c"], 2, 4, clip=8.0, scale_bits=30)
    c = SecAggClient("d0")
    c.advertise_keys(p)
    with pytest.raises(SecAggError, match="called while at"):
        c.unmask(UnmaskRequest(round_id=0, survivors=("d0",)))
    _, res = run_round({"a": np.array([100.0, -1.0]), "b": np.array([-100.0, 2.0])}, threshold=2)
    assert np.allclose(res.total, [0.0, 1.0])  # +-100 clipped to +-8 and cancel


def test_messages_round_trip_as_bytes():
    msgs = [make_params(["a", "b"], 2, 3, neighbours=None, graph_seed=1),
            AdvertiseKeys(1, "a", b"k" * 32, b"m" * 32), KeyDirectory(1, (AdvertiseKeys(1, "a", b"1" * 32, b"2" * 32),)),
            ShareKeys(1, "a", (EncryptedShare("a", "b", b"n" * 12, b"c" * 84),)),
            RoutedShares(1, "b", ("a", "b"), (EncryptedShare("a", "b", b"n" * 12, b"c" * 84),)),
            MaskedInput(1, "a", b"\x00" * 12), UnmaskRequest(1, ("a", "b")),
            UnmaskShares(1, "a", {"a": (1, b"s" * 32)}, {"b": (2, b"t" * 32)})]
    for m in msgs:
        assert type(m).from_bytes(m.to_bytes()) == m
    with pytest.raises(ValueError, match="expected a serialised SecAggParams"):
        SecAggParams.from_bytes(msgs[1].to_bytes())
