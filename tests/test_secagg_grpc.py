"""Secure aggregation inside real gRPC rounds: a coordinator on 127.0.0.1:0 with its SQLite store,
devices driving `edge_runtime.secagg_join.SecAggSession` over SecAggStep (and the real join loop
with a tiny BERT). The secure aggregate equals the plain one, dropouts are recovered, the store
never holds an individual update, and stack / svd are refused at start-up."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from coordinator.engine import aggregate, global_from_bytes
from coordinator.cli import main as coordinator_main
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from edge_runtime.secagg_join import SecAggSession
from protos import federation_pb2 as pb
from protos import wire
from protos.secagg import encode_fixed
from protos.zo import seed_pool
from test_reliability_support import SimDevice, tiny_model
from waiting import wait_until

torch.set_num_threads(1)
EXAMPLES = [10, 30, 20, 25, 15]  # per device; weights are n / cap under secagg, n in the plain round
CAP = 50


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("secagg_grpc"))


def device_update(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Device i's 'trained' adapter: the download plus a seeded change (the same in every run)."""
    g = torch.Generator().manual_seed(1000 + i)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())}


class Federation:
    """A coordinator serving one round on 127.0.0.1:0 and simulated devices (real gRPC clients)."""

    def __init__(self, model: Path, store: Path, strategy: str, ranks: list[int], secagg: bool,
                 chunk_bytes: int = 4 << 20, **cfg):
        self.chunk_bytes = chunk_bytes
        self.c = Coordinator(CoordinatorConfig(
            model=str(model), store=str(store), strategy=strategy, rounds=1, min_devices=len(ranks), max_rank=4,
            poll_interval_s=0.1, heartbeat_timeout_s=2.5, secagg=secagg, secagg_weight_cap=CAP, **cfg))
        self.server, port = create_server("127.0.0.1:0", self.c, tick_interval_s=0.1)
        self.server.start()
        self.devices = [SimDevice(f"127.0.0.1:{port}", f"dev{i}", rank=r) for i, r in enumerate(ranks)]
        for d in self.devices:
            d.register()
        self.updates: dict[str, dict[str, torch.Tensor]] = {}
        self.reports: dict[str, dict] = {}

    def device_round(self, i: int, stop_after: str | None = None) -> None:
        """Download, 'train', then upload (plain) or run the SecAgg phases; stop_after emulates a crash."""
        d = self.devices[i]
        t = d.wait_task()
        if t.mode == "zo":
            return self.zo_round(i, d, t)
        start = d.download_state(t)
        upd = device_update(start, i)
        self.updates[d.client.device_id] = upd
        if not t.secagg:
            d.client.upload(t, wire.encode_tensors(upd), pb.TrainStats(num_examples=EXAMPLES[i]))
            return
        s = SecAggSession(d.client, t, max_wait_s=30, chunk_bytes=self.chunk_bytes)
        vec = s.vector(upd, EXAMPLES[i], start)
        self.reports[d.client.device_id] = {"vector": vec, "params": s.params}
        directory = s.advertise()
        routed = s.share_keys(directory)
        if stop_after == "share_keys":
            return  # the process dies before its masked input
        request = gappy_masked_input(s, routed, vec) if stop_after == "gappy" else s.masked_input(routed, vec)
        if stop_after == "masked_input":
            return  # the process dies after its masked input arrived
        s.unmask(request)
        self.reports[d.client.device_id].update(sent=s.bytes_sent, received=s.bytes_received)

    def zo_round(self, i: int, d: SimDevice, t: pb.Task) -> None:
        """A ZO device: (seed, g) pairs from the round's pool (seed + round id), then SubmitZO or seed scalars."""
        pool = seed_pool(self.c.cfg.seed + t.round_id, self.c.cfg.secagg_zo_pool)
        g = torch.Generator().manual_seed(2000 + i)
        pairs = [(pool[int(j)], float(v)) for j, v in zip(torch.randint(len(pool), (12,), generator=g),
                                                           3 * torch.randn(12, generator=g))]
        lr = 1e-3 * (1 + 0.5 * i)  # devices' learning rates differ
        if not t.secagg:
            d.client.submit_zo(t, pairs, lr, EXAMPLES[i], pb.TrainStats(num_examples=EXAMPLES[i]))
            return
        s = SecAggSession(d.client, t, max_wait_s=30, chunk_bytes=self.chunk_bytes)
        assert s.payload.zo_scalars
        vec = s.zo_vector(pairs, lr, EXAMPLES[i])
        self.reports[d.client.device_id] = {"vector": vec, "params": s.params}
        s.run(vec)

    def run(self, stop: dict[int, str] | None = None, timeout_s: float = 40.0,
            errors: list[BaseException] | None = None) -> float:
        """Every device in its own thread; returns when round 1 closed (seconds from start).

        errors: collects the devices' exceptions (default: any exception fails the test).
        """
        t0 = time.perf_counter()
        check, errors = errors is None, [] if errors is None else errors

        def target(i: int) -> None:
            try:
                self.device_round(i, (stop or {}).get(i))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(self.devices))]
        for th in threads:
            th.start()
        try:
            wait_until(lambda: self.closed(1), timeout=timeout_s, interval=0.05, what="round 1 to close")
        finally:  # the devices' errors explain a round that did not close: report them first
            for th in threads:
                th.join(timeout=5)
            assert not (check and errors), errors
        return time.perf_counter() - t0

    def closed(self, round_id: int) -> bool:
        return any(r["round_id"] == round_id and r["state"] != "open" for r in self.c.store.rounds())

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.server.stop(0)
        self.c.close()


def gappy_masked_input(s: SecAggSession, routed, vec: np.ndarray):
    """The masked input in chunks sent out of order: a gap is refused with the offset to resume from,
    a re-sent chunk is harmless, then the rest completes the message."""
    from protos.secagg import UnmaskRequest

    data, n, task, send = s.sa.masked_input(routed, vec).to_bytes(), s.chunk_bytes, s.task, s.client.secagg_step
    assert len(data) > 3 * n
    assert send(task, pb.SECAGG_MASKED_INPUT, data[:n], offset=0, total_bytes=len(data)).received_bytes == n
    with pytest.raises(grpc.RpcError) as ei:
        send(task, pb.SECAGG_MASKED_INPUT, data[2 * n:3 * n], offset=2 * n, total_bytes=len(data))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"resend from offset {n}" in ei.value.details()
    assert send(task, pb.SECAGG_MASKED_INPUT, data[:n], offset=0, total_bytes=len(data)).received_bytes == n
    off, reply = n, None
    while off < len(data):
        reply = send(task, pb.SECAGG_MASKED_INPUT, data[off:off + n], offset=off, total_bytes=len(data))
        off = reply.received_bytes
    if reply.wait:  # the others' masked inputs are not all in yet: ask again until the unmask request comes
        reply = wait_until(lambda: None if (r := send(task, pb.SECAGG_MASKED_INPUT, b"")).wait else r, timeout=30,
                           interval=0.05, what="the unmask request after the masked input")
    return UnmaskRequest.from_bytes(reply.payload)


def assert_same_global(a, b, atol: float) -> float:
    """Effective factors (A, scale * B) and extras agree within atol; returns the max difference."""
    err = 0.0
    assert a.modules.keys() == b.modules.keys() and a.extra.keys() == b.extra.keys()
    for m, u in a.modules.items():
        v = b.modules[m]
        err = max(err, float((u.A - v.A).abs().max()), float((u.B * u.scale - v.B * v.scale).abs().max()))
    for k, t in a.extra.items():
        err = max(err, float((t - b.extra[k]).abs().max()))
    assert err < atol, f"secure aggregate differs from the plain one by {err:.3g}"
    return err


def windows(t: torch.Tensor | np.ndarray, dtype: str, width: int = 48) -> list[bytes]:
    """Byte strings from an array's little-endian encoding, as any file storing the array would contain."""
    b = np.asarray(t, dtype=dtype).reshape(-1).tobytes()
    return [b[i:i + width] for i in range(0, max(len(b) - width, 1), max(len(b) // 4, width)) if len(b) >= width]


def leaked(store: Path, fed: Federation) -> list[str]:
    """Devices whose unmasked update (float32 tensors, float64 payload, its fixed-point form) is in a store file."""
    blobs = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    found = []
    for dev, upd in fed.updates.items():
        needles = [w for t in upd.values() if t.numel() >= 12 for w in windows(t.numpy(), "<f4")]
        rep = fed.reports.get(dev)
        if rep is not None:
            p = rep["params"]
            needles += windows(rep["vector"], "<f8") + windows(encode_fixed(rep["vector"], p.clip, p.scale_bits)[0], "<u4")
        if any(n in blob for n in needles for blob in blobs):
            found.append(dev)
    return found


@pytest.mark.parametrize("strategy,ranks", [("zero_pad", [2, 4, 4]), ("fedavg", [4, 4, 4]), ("ia3", [2, 4, 4]),
                                            ("bitfit", [2, 4, 4]), ("prompt_tuning", [2, 4, 4]), ("ffa", [2, 4, 4]),
                                            ("rolora", [2, 4, 4]), ("adapter", [2, 4, 4])])
def test_secagg_round_matches_plain_round_and_store_holds_no_update(model, tmp_path, strategy, ranks):
    plain = Federation(model, tmp_path / "plain", strategy, ranks, secagg=False)
    secure = Federation(model, tmp_path / "secure", strategy, ranks, secagg=True)
    try:
        plain_s = plain.run()
        secure_s = secure.run()
        assert [r["state"] for r in secure.c.store.rounds()] == ["aggregated"]
        err = assert_same_global(plain.c.global_state, secure.c.global_state, atol=1e-6)
        m = secure.c.store.rounds()[0]["metrics"]
        plain_bytes = sum(u["wire_bytes"] for u in plain.c.store.updates(1))
        dev_bytes = sum(r["sent"] + r["received"] for r in secure.reports.values())
        print(f"\n{strategy} ranks {ranks}: max |secure - plain| = {err:.2e}; vector_len {m['secagg_vector_len']}; "
              f"plain uploads {plain_bytes} B in {plain_s:.2f}s, secagg protocol {dev_bytes} B (devices, both ways) "
              f"in {secure_s:.2f}s (coordinator: {m['secagg_bytes_in']} B in, {m['secagg_bytes_out']} B out, "
              f"protocol {m['secagg_seconds']:.2f}s)")
        assert m["secagg_survivors"] == 3 and m["uploads"] == 3
        # (c) nothing in the secure store is any device's unmasked update; the detector finds them in the plain store
        assert secure.c.store.updates() == []
        assert leaked(tmp_path / "secure", secure) == []
        assert sorted(leaked(tmp_path / "plain", plain)) == sorted(plain.updates)
    finally:
        plain.close()
        secure.close()


def test_masked_inputs_larger_than_a_message_travel_in_chunks(model, tmp_path):
    """Chunks of 256 B (instead of 4 MiB) so the tiny model's masked inputs take many SecAggSteps; one
    device sends a gap and a duplicate chunk on the way. The result equals the plain round."""
    plain = Federation(model, tmp_path / "plain", "zero_pad", [2, 4, 4], secagg=False)
    secure = Federation(model, tmp_path / "secure", "zero_pad", [2, 4, 4], secagg=True, chunk_bytes=256)
    try:
        plain.run()
        secure.run(stop={1: "gappy"})
        assert [r["state"] for r in secure.c.store.rounds()] == ["aggregated"]
        m = secure.c.store.rounds()[0]["metrics"]
        assert m["secagg_survivors"] == 3 and 4 * m["secagg_vector_len"] > 10 * 256
        assert_same_global(plain.c.global_state, secure.c.global_state, atol=1e-6)
        assert secure.c.secagg_rounds.parts == {}  # nothing left buffered
    finally:
        plain.close()
        secure.close()


def test_zo_devices_send_seed_scalars_and_match_the_plain_replay(model, tmp_path):
    """Strategy zo under secagg: each device sends pool + 1 masked scalars (not its adapter); the
    coordinator's one replay of the averaged scalars equals the plain round's per-device replays."""
    plain = Federation(model, tmp_path / "plain", "zo", [4, 4, 4], secagg=False, secagg_zo_pool=64)
    secure = Federation(model, tmp_path / "secure", "zo", [4, 4, 4], secagg=True, secagg_zo_pool=64)
    try:
        plain.run()
        secure.run()
        assert [r["state"] for r in secure.c.store.rounds()] == ["aggregated"]
        m = secure.c.store.rounds()[0]["metrics"]
        adapter_len = round_payload_len(secure)
        assert m["secagg_vector_len"] == 65 and adapter_len > 10 * 65
        err = assert_same_global(plain.c.global_state, secure.c.global_state, atol=1e-6)
        print(f"\nzo seed scalars: {m['secagg_vector_len']} values per device instead of {adapter_len}; "
              f"max |secure - plain| = {err:.2e}")
        assert secure.c.store.updates() == []
    finally:
        plain.close()
        secure.close()


def round_payload_len(fed: Federation) -> int:
    """Values per device if the round sent adapters (the zo strategy without seed scalars)."""
    from coordinator.secagg_round import round_payload

    return round_payload(fed.c.global_state, fed.c.method, [4], 1).vector_len


def test_dropouts_are_recovered_from_the_survivors_shares(model, tmp_path):
    """dev4 dies after its masked input (its input counts: its self-mask is rebuilt from shares);
    dev3 dies after sharing keys (excluded: its pairwise masks are removed via its key shares)."""
    fed = Federation(model, tmp_path / "store", "zero_pad", [4, 2, 4, 4, 2], secagg=True, secagg_threshold=3,
                     secagg_phase_timeout_s=20, quorum=0.6)
    try:
        fed.run(stop={3: "share_keys", 4: "masked_input"})
        rounds = fed.c.store.rounds()
        assert rounds[0]["state"] == "aggregated", fed.c.store.events("secagg_abort")
        done = fed.c.store.events("secagg_done")[0]
        ids = [d.client.device_id for d in fed.devices]
        assert sorted(done["survivors"]) == sorted(ids[:3] + [ids[4]]) and done["dropped"] == [ids[3]]
        g0 = global_from_bytes(fed.c.store.read_blob("rounds/0000/global.safetensors"))
        uploads = [(ids[i], fed.updates[ids[i]], EXAMPLES[i]) for i in (0, 1, 2, 4)]
        want = aggregate(fed.c.method, g0, uploads, policy=fed.c.policy)  # the plain engine on the survivors' updates
        assert_same_global(want, fed.c.global_state, atol=1e-6)
        assert leaked(tmp_path / "store", fed) == []
    finally:
        fed.close()


def test_below_threshold_the_round_fails_and_keeps_the_global(model, tmp_path, caplog):
    fed = Federation(model, tmp_path / "store", "fedavg", [4, 4, 4, 4], secagg=True, secagg_threshold=3,
                     secagg_phase_timeout_s=20, quorum=0.6)
    try:
        before = {m: u.A.clone() for m, u in fed.c.global_state.modules.items()}
        errors: list[BaseException] = []
        with caplog.at_level(logging.WARNING, logger="coordinator"):
            fed.run(stop={0: "share_keys", 1: "share_keys"}, errors=errors)
        assert fed.c.store.rounds()[0]["state"] == "failed"
        reason = fed.c.store.events("secagg_abort")[0]["reason"]
        assert "only 2 of 4 devices sent masked inputs; the threshold is 3" in reason
        assert any("failed: secure aggregation aborted" in r.getMessage() for r in caplog.records)
        # the two waiting survivors are told why (FAILED_PRECONDITION: they move on to the next round)
        assert len(errors) == 2 and all(isinstance(e, grpc.RpcError) for e in errors)
        assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION and "threshold is 3" in e.details() for e in errors)
        assert fed.c.global_round == 0 and all(torch.equal(u.A, before[m]) for m, u in fed.c.global_state.modules.items())
    finally:
        fed.close()


@pytest.mark.parametrize("strategy", ["stack", "svd"])
def test_secagg_refuses_stack_and_svd_at_start_up(model, tmp_path, strategy, capsys):
    with pytest.raises(ValueError, match="cannot run under secure aggregation: .*(individual|per-device products)") as ei:
        CoordinatorConfig(model=str(model), store=str(tmp_path / "s"), strategy=strategy, min_devices=3, secagg=True)
    assert "fedavg" in str(ei.value) and "turn secure aggregation off" in str(ei.value)
    rc = coordinator_main(["serve", "--model", str(model), "--store", str(tmp_path / "cli"), "--strategy", strategy,
                           "--secagg", "--min-devices", "3", "--insecure", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"strategy {strategy!r} cannot run under secure aggregation" in err and "Use one of" in err
    assert not (tmp_path / "cli").exists()  # refused before anything was created


@pytest.mark.parametrize("strategy,pool", [("fedsa", 0), ("zo", 64), ("ia3", 0), ("feddpa", 0), ("adapter", 0)])
def test_join_loop_trains_and_runs_secagg(model, tmp_path, strategy, pool):
    """Three real devices (`run_join`, LocalTrainer on the tiny BERT) through two secure rounds; under
    zo they train with the round's seed pool and send pool + 1 scalars instead of their adapters; under
    ia3 / adapter (built as LoRA, told by the download's contract) they mask their (IA)3 vectors' /
    bottleneck adapters' change; under feddpa they train rank 4 + 4 personal slots and mask only the
    global rank-4 adapter."""
    from edge_runtime.client import JoinConfig, run_join
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan
    from edge_runtime.profile import load_profile

    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "store"), strategy=strategy, rounds=2,
                                      min_devices=3, max_rank=4, local_steps=2, lr=1e-2, poll_interval_s=0.1,
                                      secagg=True, secagg_zo_pool=pool))
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    profile = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "laptop-cpu-16gb.yaml")
    records = load_sst2("train", limit=48)
    results: dict[int, dict] = {}
    threads = []
    for i, rank in enumerate([4, 2, 4] if strategy == "fedsa" else [4, 4, 4]):
        plan = Plan(mode="lora", rank=rank, target_modules=["query", "value"], batch_size=4, seq_len=16)
        cfg = JoinConfig(target=f"127.0.0.1:{port}", model=str(model), plan=plan, profile=profile,
                         records=records[i * 16:(i + 1) * 16], name=f"join{i}", threads=1, max_poll_s=0.2,
                         heartbeat_s=0.5)
        th = threading.Thread(target=lambda i=i, cfg=cfg: results.update({i: run_join(cfg)}), daemon=True)
        th.start()
        threads.append(th)
    try:
        for th in threads:
            th.join(timeout=120)
        assert len(results) == 3, "a device did not finish"
        assert [r["state"] for r in c.store.rounds()] == ["aggregated", "aggregated"]
        for r in results.values():
            assert [x["accepted"] for x in r["rounds"]] == [True, True]
            assert all(x["upload_bytes"] > 0 for x in r["rounds"])
        assert c.store.updates() == []  # nothing per device was stored
        assert c.global_round == 2 and c.global_state.strategy == strategy == c.method.name
        lens = [r["metrics"]["secagg_vector_len"] for r in c.store.rounds()]
        if strategy in ("ia3", "adapter"):  # the payload is the named tensors (+ the head), nothing else
            g = c.global_state
            assert not g.modules and lens == [sum(t.numel() for t in g.extra.values()) + 1] * 2, lens
            if strategy == "ia3":  # the scalings moved from 1
                assert any(not torch.equal(t, torch.ones_like(t)) for k, t in g.extra.items() if "ia3_l" in k)
            else:  # the adapters' W_up moved from 0
                assert any(t.any() for k, t in g.extra.items() if k.endswith("bottleneck_adapter.up.weight"))
        elif strategy == "feddpa":  # the global adapter at rank 4 (+ head): the personal slots stay on the devices
            g = c.global_state
            size = sum(u.A.numel() + u.B.numel() for u in g.modules.values()) + sum(t.numel() for t in g.extra.values())
            assert all(u.rank == 4 for u in g.modules.values()) and lens == [size + 1] * 2, (lens, size)
        else:
            assert lens == [pool + 1] * 2 if pool else all(n > 500 for n in lens), lens
    finally:
        server.stop(0)
        c.close()
