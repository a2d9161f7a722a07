"""Faults around a live coordinator: a device process killed mid-upload (its upload resumes from
UploadStatus, or the round completes by quorum without it), a corrupted checkpoint (detected by
its checksum; the previous round's global is used), and 200 concurrent uploads on loopback."""
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from coordinator.engine import global_from_bytes
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire
from test_reliability_support import ENV, ROOT, SimDevice, tiny_model
from waiting import wait_until

torch.set_num_threads(1)

UPLOADER = r"""
import json, sys
from pathlib import Path
from edge_runtime.client import FederationClient, RetryPolicy
from protos import federation_pb2 as pb, wire
target, out, reuse = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
c = FederationClient(target, retry=RetryPolicy(attempts=2), chunk_size=512,
                     throttle_up=wire.TokenBucket(3000, burst_bytes=512))
if reuse:
    c.token, c.device_id = json.loads(Path(reuse).read_text())["token"], json.loads(Path(reuse).read_text())["device_id"]
else:
    c.register("{}", json.dumps({"rank": 4, "mode": "lora"}), "victim")
while True:
    t = c.get_task()
    if t.state == pb.Task.TRAIN:
        break
state = wire.decode_tensors(c.download(t))[0]
data = wire.encode_tensors({k: v * 1.01 for k, v in state.items()})
(out.parent / (out.name + ".bin")).write_bytes(data)
out.write_text(json.dumps({"token": c.token, "device_id": c.device_id, "round_id": t.round_id, "nonce": t.nonce,
                           "size": len(data), "sha256": wire.sha256_hex(data)}))
c.upload(t, data, pb.TrainStats(num_examples=5), upload_id="victim-upload")
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("faults"))


def _serve(model, store, **kw):
    cfg = dict(model=str(model), store=str(store), strategy="zero_pad", min_devices=1, max_rank=4,
               poll_interval_s=0.05)
    c = Coordinator(CoordinatorConfig(**{**cfg, **kw}))
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    return c, server, port


def _kill_mid_upload(target, tmp, name, partial_dir, keep_alive, reuse=""):
    """Run UPLOADER in a subprocess and SIGKILL it once some (not all) bytes reached the server."""
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    p = subprocess.Popen([sys.executable, "-c", UPLOADER, target, str(out), reuse], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=open(log, "w"))

    def mid_upload() -> bool:
        keep_alive()
        parts = list(partial_dir.glob("*victim-upload.part"))
        if out.exists() and parts and parts[0].stat().st_size >= 1024:
            return True
        assert p.poll() is None, f"the uploader exited with {p.returncode}:\n{log.read_text()[-2000:]}"
        return False

    try:
        wait_until(mid_upload, timeout=60, interval=0.05, what="the uploader to get mid-upload (>= 1 kB received)",
                   diagnose=lambda: log.read_text()[-2000:])
        p.kill()
        p.wait()
        return json.loads(out.read_text()), (tmp / f"{name}.json.bin").read_bytes()
    finally:
        if p.poll() is None:
            p.kill()


def test_device_killed_mid_upload_resumes_or_quorum_completes(model, tmp_path):
    c, server, port = _serve(model, tmp_path / "store", rounds=2, min_devices=3, quorum=0.6,
                             heartbeat_timeout_s=3.0)
    target = f"127.0.0.1:{port}"
    others = [SimDevice(target, f"ok{i}") for i in range(2)]
    try:
        for d in others:
            d.register()
        keep_alive = lambda: [d.client.heartbeat() for d in others]  # noqa: E731
        # round 1: killed mid-upload, then the restarted device resumes from UploadStatus
        info, data = _kill_mid_upload(target, tmp_path, "r1", c.store.root / "partial", keep_alive)
        ch = grpc.insecure_channel(target)
        stub = pbg.FederationStub(ch)
        md = [("authorization", f"Bearer {info['token']}")]
        off = stub.UploadStatus(pb.UploadStatusRequest(round_id=info["round_id"], upload_id="victim-upload"),
                                metadata=md).received_offset
        header = pb.UploadHeader(round_id=info["round_id"], nonce=info["nonce"], total_size=info["size"],
                                 sha256=info["sha256"], kind=pb.LORA, upload_id="victim-upload",
                                 stats=pb.TrainStats(num_examples=5))
        reply = stub.UploadUpdate(wire.upload_chunks(header, data, start=off, chunk_size=512), metadata=md)
        print(f"\nround 1: device killed after {off}/{len(data)} bytes; resumed at offset {off}, sent the "
              f"remaining {len(data) - off} bytes; accepted={reply.accepted}")
        assert 0 < off < len(data) and reply.accepted and reply.received_bytes == len(data)
        for d in others:
            t = d.wait_task()
            assert d.upload(t, d.update_bytes(d.download_state(t), seed=1)).accepted
        # round 2: killed mid-upload and never back -> dropped after the heartbeat timeout, quorum 2/3 aggregates
        (tmp_path / "victim.json").write_text(json.dumps(info))
        t0 = time.time()
        _kill_mid_upload(target, tmp_path, "r2", c.store.root / "partial", keep_alive, str(tmp_path / "victim.json"))
        for d in others:
            t = d.wait_task()
            assert t.round_id == 2
            assert d.upload(t, d.update_bytes(d.download_state(t), seed=2)).accepted
        def round2_closed() -> bool:
            keep_alive()
            return c.store.rounds()[1]["state"] != "open"

        # the victim is dropped after the 3 s heartbeat timeout; the bound only guards against a hang
        wait_until(round2_closed, timeout=60, interval=0.2, what="round 2 to close without the killed device",
                   diagnose=lambda: c.store.rounds()[1])
        r2 = c.store.rounds()[1]
        print(f"round 2: device killed mid-upload and gone; round closed as {r2['state']} after "
              f"{time.time() - t0:.1f}s with {len(c.store.updates(2))}/3 uploads, dropped {r2['dropped']}")
        assert r2["state"] == "aggregated" and r2["dropped"] == [info["device_id"]]
        assert [r["state"] for r in c.store.rounds()] == ["aggregated", "aggregated"]
        ch.close()
    finally:
        for d in others:
            d.close()
        server.stop(0)
        c.close()


def test_corrupted_checkpoint_falls_back_to_previous_round(model, tmp_path):
    store = tmp_path / "store"
    c, server, port = _serve(model, store, rounds=3)
    dev = SimDevice(f"127.0.0.1:{port}", "d")
    dev.register()
    for r in range(2):
        t = dev.wait_task()
        assert dev.upload(t, dev.update_bytes(dev.download_state(t), seed=r, step=0.05)).accepted
    server.stop(0)
    c.close()
    g1 = (store / "rounds" / "0001" / "global.safetensors").read_bytes()
    f2 = store / "rounds" / "0002" / "global.safetensors"
    raw = bytearray(f2.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the tensor data
    f2.write_bytes(bytes(raw))

    c, server, port = _serve(model, store, rounds=3)
    try:
        ev = c.store.events("checkpoint_corrupt")
        print(f"\ncorrupted rounds/0002/global.safetensors: detected={bool(ev)}, using round {c.global_round}, "
              f"round states {[r['state'] for r in c.store.rounds()]}")
        assert c.global_round == 1 and ev and ev[0]["corrupted"] == [2]
        ref = global_from_bytes(g1)  # exactly round 1's global
        assert all(torch.equal(ref.modules[k].A, u.A) and torch.equal(ref.modules[k].B, u.B)
                   for k, u in c.global_state.modules.items())
        assert all(torch.equal(ref.extra[k], v) for k, v in c.global_state.extra.items())
        assert [r["state"] for r in c.store.rounds()][:2] == ["aggregated", "failed"]  # round 2 runs again
        dev.client.close()
        dev = SimDevice(f"127.0.0.1:{port}", "d")
        dev.register()
        for r in range(2):  # the federation goes on: two more rounds reach the 3 aggregated asked for
            t = dev.wait_task()
            assert dev.upload(t, dev.update_bytes(dev.download_state(t), seed=10 + r)).accepted
        states = [r["state"] for r in c.store.rounds()]
        assert states == ["aggregated", "failed", "aggregated", "aggregated"] and c.fed.done
    finally:
        dev.close()
        server.stop(0)
        c.close()


def test_200_concurrent_uploads(model, tmp_path):
    n = 200
    c, server, port = _serve(model, tmp_path / "store", rounds=1, min_devices=n, round_timeout_s=300)
    target = f"127.0.0.1:{port}"
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Barrier(n)

    def device(i: int) -> float:
        d = SimDevice(target, f"dev{i:03d}")
        try:
            d.register()
            t = wait_until(lambda: (task := d.client.get_task()).state == pb.Task.TRAIN and task, timeout=120,
                           interval=0.3, what=f"dev{i}: a TRAIN task")
            state = d.download_state(t)
            data = d.update_bytes(state, seed=i)
            done.wait(timeout=120)  # every device uploads at the same moment
            t0 = time.perf_counter()
            assert d.upload(t, data).accepted
            return time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(f"dev{i}: {type(e).__name__}: {e}")
            return float("nan")
        finally:
            d.close()

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            times = list(pool.map(device, range(n)))
        wall = time.perf_counter() - t0
        wait_until(lambda: c.store.rounds()[0]["state"] != "open", timeout=60, interval=0.1,
                   what="the round of 200 uploads to close", diagnose=lambda: c.store.rounds()[0])
        rnd = c.store.rounds()[0]
        ok = sorted(x for x in times if x == x)
        print(f"\n{n} devices on loopback: {len(ok)} uploads accepted, {len(errors)} errors, wall {wall:.1f}s; "
              f"upload latency p50 {ok[len(ok) // 2]:.2f}s p95 {ok[int(len(ok) * 0.95) - 1]:.2f}s max {ok[-1]:.2f}s; "
              f"round {rnd['state']} with {len(c.store.updates(1))} updates "
              f"(aggregate {rnd['metrics'].get('aggregate_s', float('nan')):.2f}s)")
        assert not errors, errors[:5]
        assert len(c.store.updates(1)) == n and rnd["state"] == "aggregated"
    finally:
        server.stop(0)
        c.close()
