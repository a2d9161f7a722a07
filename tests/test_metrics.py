"""Prometheus metrics over real HTTP: a coordinator (gRPC on 127.0.0.1:0 + ops HTTP server) runs
one round with a real device (`run_join`, tiny BERT) and a hand-driven probe device that also
sends refused updates; both /metrics endpoints are scraped and checked against the store and
the device's own report."""
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from coordinator.dashboard import start_ops_server, start_ops_servers, stop_ops_servers
from coordinator.metrics import histogram_buckets, reject_reason
from coordinator.rounds import DuplicateUpload, LateUpload, WrongRound
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig, UploadRejected, UploadTooLarge
from coordinator.validation import UpdateInvalid
from edge_runtime.client import FederationClient, JoinConfig, RetryPolicy, run_join
from edge_runtime.metrics import RuntimeMetrics
from edge_runtime.plan import Plan
from edge_runtime.profile import load_profile
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of a real /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _upload(stub, md, t, data, *, nonce=None, upload_id="probe"):
    h = pb.UploadHeader(round_id=t.round_id, nonce=nonce or t.nonce, total_size=len(data),
                        sha256=wire.sha256_hex(data), kind=pb.LORA, upload_id=upload_id,
                        stats=pb.TrainStats(num_examples=4))
    return stub.UploadUpdate(wire.upload_chunks(h, data, chunk_size=4096), metadata=md)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from edge_runtime.data import load_sst2
    from edge_runtime.training.tiny import make_tiny_bert

    tmp = tmp_path_factory.mktemp("metrics")
    model = make_tiny_bert(tmp / "bert", hidden=32, vocab_size=300)
    ev = tmp / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=32)))
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp / "store"), strategy="zero_pad", rounds=1,
                                      min_devices=2, max_rank=4, local_steps=2, lr=1e-2, eval_data=str(ev),
                                      eval_limit=32, max_upload_bytes=400_000, poll_interval_s=0.1))
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    ops, ops_port = start_ops_server(c, "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pbg.FederationStub(channel)

    # the real device: run_join in a thread, its own metrics registry served over HTTP
    rm = RuntimeMetrics()
    rm_server, rm_port = rm.serve(0)
    plan = Plan(mode="lora", rank=4, target_modules=["query", "value"], batch_size=4, seq_len=16)
    cfg = JoinConfig(target=f"127.0.0.1:{port}", model=str(model), plan=plan,
                     profile=load_profile(ROOT / "profiles" / "laptop-cpu-16gb.yaml"),
                     records=load_sst2("train", limit=16), name="jetson-sim-a", threads=1, max_poll_s=0.2,
                     on_round=rm.observe_round, on_retry=rm.retry)
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(run_join(cfg)), daemon=True)
    th.start()

    # the probe device: registers, sends refused updates, then a good one
    reg = stub.Register(pb.RegisterRequest(profile_json=json.dumps({"accelerator": "cpu"}),
                                           plan_json=json.dumps({"rank": 4, "mode": "lora"}), device_name="probe-b"))
    md = [("authorization", f"Bearer {reg.device_token}")]
    t = wait_until(lambda: (task := stub.GetTask(pb.TaskRequest(), metadata=md)).state == pb.Task.TRAIN and task,
                   timeout=60, interval=0.1, what="the probe device's TRAIN task")
    blob = b"".join(ch.data for ch in stub.DownloadGlobal(pb.DownloadRequest(round_id=t.round_id,
                                                                             download_id=t.download_id), metadata=md))
    state = wire.decode_tensors(blob)[0]
    refused = []
    bad_shape = {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in state.items()}
    for data, kw in ((wire.encode_tensors(bad_shape), {"upload_id": "p1"}),
                     (wire.encode_tensors(state), {"nonce": "stale", "upload_id": "p2"}),
                     (wire.encode_tensors({k: v * float("nan") for k, v in state.items()}), {"upload_id": "p3"})):
        with pytest.raises(grpc.RpcError) as ei:
            _upload(stub, md, t, data, **kw)
        refused.append(ei.value.code())
    good = wire.encode_tensors({k: v * 1.01 for k, v in state.items()})
    assert _upload(stub, md, t, good, upload_id="p4").accepted
    th.join(timeout=90)
    assert not th.is_alive(), "the device did not finish its round"
    yield {"c": c, "ops_port": ops_port, "rm_port": rm_port, "result": result, "probe_blob": blob,
           "refused": refused, "rm": rm, "tmp": tmp, "model": model}
    channel.close()
    server.stop(0)
    stop_ops_servers([ops])
    rm_server.shutdown()
    c.close()


def test_coordinator_metrics_after_a_round(federation):
    c, m = federation["c"], scrape(f"http://127.0.0.1:{federation['ops_port']}/metrics")
    assert federation["refused"] == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.INVALID_ARGUMENT]
    assert m[("edgefed_rounds_completed_total", ())] == 1
    assert m[("edgefed_rounds_failed_total", ())] == 0
    assert m[("edgefed_round_duration_seconds_count", ())] == 1
    rnd = c.store.rounds()[0]
    assert m[("edgefed_round_duration_seconds_sum", ())] == pytest.approx(rnd["closed_at"] - rnd["opened_at"])
    assert m[("edgefed_round_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert m[("edgefed_aggregation_seconds_count", ())] == 1
    assert m[("edgefed_aggregation_seconds_sum", ())] == pytest.approx(rnd["metrics"]["aggregate_s"])
    assert m[("edgefed_devices_registered", ())] == 2 and m[("edgefed_devices_active", ())] == 2
    assert m[("edgefed_updates_accepted_total", (("kind", "LORA"),))] == 2
    assert m[("edgefed_updates_accepted_total", (("kind", "ZO"),))] == 0
    rej = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "edgefed_updates_rejected_total"}
    assert rej == {"shape": 1, "replay": 1, "non_finite": 1}
    wire_bytes = sum(u["wire_bytes"] for u in c.store.updates())
    assert wire_bytes > 0 and m[("edgefed_upload_bytes_total", ())] == wire_bytes
    device_down = federation["result"]["rounds"][0]["download_bytes"]
    assert m[("edgefed_download_bytes_total", ())] == device_down + len(federation["probe_blob"])
    assert m[("edgefed_eval_round", ())] == 1
    assert m[("edgefed_eval_loss", ())] == pytest.approx(rnd["metrics"]["loss"])
    assert m[("edgefed_eval_accuracy", ())] == pytest.approx(rnd["metrics"]["accuracy"])
    assert m[("process_resident_memory_bytes", ())] > 0
    assert m[("edgefed_current_round", ())] == 1 and m[("edgefed_round_open", ())] == 0


def test_runtime_metrics_from_join(federation):
    m = scrape(f"http://127.0.0.1:{federation['rm_port']}/metrics")
    (rep,) = federation["result"]["rounds"]
    assert rep["accepted"]
    assert m[("edgeruntime_rounds_total", (("accepted", "true"),))] == 1
    assert m[("edgeruntime_train_seconds_count", ())] == 1
    assert m[("edgeruntime_train_seconds_sum", ())] == pytest.approx(rep["train_s"])
    assert m[("edgeruntime_peak_rss_bytes", ())] == rep["peak_rss_bytes"] > 50 * 2**20
    assert m[("edgeruntime_upload_bytes_total", ())] == rep["upload_bytes"] > 0
    assert m[("edgeruntime_download_bytes_total", ())] == rep["download_bytes"] > 0
    assert m[("edgeruntime_assigned_rank", ())] == 4
    assert m[("edgeruntime_last_round_id", ())] == 1
    assert not [k for k in m if k[0] == "edgeruntime_retries_total"]  # no retries on a healthy loopback


def test_retries_are_counted_against_an_unreachable_coordinator():
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rm = RuntimeMetrics(process=False)
    client = FederationClient(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=3, base_s=0.01, max_s=0.02),
                              rpc_timeout_s=2.0)
    client.on_retry = rm.retry
    with pytest.raises(grpc.RpcError) as ei:
        client.get_task()
    client.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    text = rm.render().decode()
    assert 'edgeruntime_retries_total{call="GetTask"} 2.0' in text


def test_each_coordinator_has_its_own_registry(federation, tmp_path):
    c2 = Coordinator(CoordinatorConfig(model=str(federation["model"]), store=str(tmp_path / "store2"),
                                       strategy="zero_pad", rounds=1, max_rank=4))
    try:
        servers = start_ops_servers(c2, "127.0.0.1", 0, 0)
        assert servers == []  # port 0 = off
        srv, port = start_ops_server(c2, "127.0.0.1", 0, dashboard=False)
        m2 = scrape(f"http://127.0.0.1:{port}/metrics")
        assert m2[("edgefed_rounds_completed_total", ())] == 0
        assert m2[("edgefed_devices_registered", ())] == 0
        assert not [k for k in m2 if k[0] == "edgefed_updates_rejected_total"]
        with pytest.raises(urllib.error.HTTPError) as ei:  # the dashboard routes are off on this server
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5)
        assert ei.value.code == 404
        stop_ops_servers([srv])
        with pytest.raises(ValueError, match="--metrics-port"):
            start_ops_servers(c2, "127.0.0.1", 70000, 0)
    finally:
        c2.close()
    m1 = scrape(f"http://127.0.0.1:{federation['ops_port']}/metrics")
    assert m1[("edgefed_devices_registered", ())] == 2


def test_reject_reasons_and_buckets():
    assert reject_reason(LateUpload("round 3 is closed")) == "late"
    assert reject_reason(DuplicateUpload("already")) == "duplicate"
    assert reject_reason(WrongRound("nonce 'x' does not match", reason="replay")) == "replay"
    assert reject_reason(WrongRound("round 9 does not exist yet")) == "wrong_round"
    assert reject_reason(UploadTooLarge("upload of 9 bytes exceeds the cap")) == "too_large"
    assert reject_reason(UploadRejected("upload sha256 does not match", reason="checksum")) == "checksum"
    assert reject_reason(UpdateInvalid("norm_bound", "upload norm 3e4 exceeds the bound 1e4")) == "norm_bound"
    assert reject_reason(UploadRejected("anything else")) == "malformed"
    assert reject_reason(ValueError("plain")) == "malformed" and reject_reason(KeyError("x")) == "other"
    assert reject_reason(wire.WireError("blob is not a valid safetensors file")) == "malformed"
    assert histogram_buckets([0.5, 2, 2, 70], (1.0, 5.0, 60.0)) == [
        ("1.0", 1.0), ("5.0", 3.0), ("60.0", 3.0), ("+Inf", 4.0)]


def test_join_cli_serves_metrics_while_it_runs(federation, tmp_path):
    """`edge-runtime join --metrics-port P` in a real process: scraped mid-federation."""
    import os
    import socket
    import subprocess
    import sys

    from edge_runtime.data import load_sst2

    c = Coordinator(CoordinatorConfig(model=str(federation["model"]), store=str(tmp_path / "store"),
                                      strategy="zero_pad", rounds=1, min_devices=2, max_rank=4, local_steps=1,
                                      poll_interval_s=0.2))
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    data, plan = tmp_path / "d.jsonl", tmp_path / "plan.json"
    data.write_text("\n".join(json.dumps(r) for r in load_sst2("train", limit=8)))
    plan.write_text(json.dumps({"mode": "lora", "rank": 4, "target_modules": ["query", "value"], "batch_size": 4,
                                "seq_len": 16}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "join", f"127.0.0.1:{port}", "--profile",
                             str(ROOT / "profiles" / "laptop-cpu-16gb.yaml"), "--model", str(federation["model"]),
                             "--data", str(data), "--plan", str(plan), "--insecure", "--threads", "1", "--name",
                             "cli-dev", "--metrics-port", str(mport)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pbg.FederationStub(channel)
        reg = stub.Register(pb.RegisterRequest(profile_json="{}", plan_json=json.dumps({"rank": 4, "mode": "lora"}),
                                               device_name="probe"))  # second device: the round opens
        md = [("authorization", f"Bearer {reg.device_token}")]
        def round_accepted() -> dict:
            assert proc.poll() is None, f"edge-runtime join exited with {proc.returncode}:\n{proc.stdout.read()}"
            m = scrape(f"http://127.0.0.1:{mport}/metrics")
            return m if m.get(("edgeruntime_rounds_total", (("accepted", "true"),))) == 1 else {}

        # generous: the process imports torch on a shared machine
        m = wait_until(round_accepted, timeout=150, interval=0.3, ignore=(OSError,),
                       what="edge-runtime join's /metrics to show one accepted round")
        assert proc.poll() is None, proc.stdout.read()
        assert m[("edgeruntime_upload_bytes_total", ())] > 0 and m[("edgeruntime_peak_rss_bytes", ())] > 0
        t = stub.GetTask(pb.TaskRequest(), metadata=md)  # the probe answers: the federation finishes
        blob = b"".join(ch.data for ch in stub.DownloadGlobal(
            pb.DownloadRequest(round_id=t.round_id, download_id=t.download_id), metadata=md))
        assert _upload(stub, md, t, wire.encode_tensors(wire.decode_tensors(blob)[0])).accepted
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        channel.close()
        server.stop(0)
        c.close()
