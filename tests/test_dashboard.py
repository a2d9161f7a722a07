"""The status page and its JSON API over real HTTP, after two real rounds on a tiny BERT driven by
three gRPC devices; the page is rendered in a real headless Chromium (Playwright) when one is
installed: screenshot non-blank, device names and the accuracy curve on the page."""
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.dashboard import start_ops_server, stop_ops_servers
from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from edge_runtime.profile import load_profile
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
DEVICES = [  # (name, profile file, plan)
    ("jetson-orin-nano", "jetson-orin-nano-8gb.yaml", {"mode": "lora", "rank": 8, "base_precision": "nf4",
                                                       "batch_size": 8, "seq_len": 128, "upload_precision": "fp16"}),
    ("raspberry-pi-5", "raspberry-pi-5-8gb.yaml", {"mode": "lora", "rank": 2, "base_precision": "int8",
                                                   "batch_size": 2, "seq_len": 64, "upload_precision": "int8"}),
    ("laptop-cpu", "laptop-cpu-16gb.yaml", {"mode": "lora", "rank": 4, "base_precision": "fp32",
                                            "batch_size": 4, "seq_len": 128, "upload_precision": "fp32"}),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    """A system Chromium/Chrome binary ($EDGEFED_CHROMIUM first); never downloads one."""
    for c in (os.environ.get("EDGEFED_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
              shutil.which("chromium") or "", shutil.which("google-chrome") or ""):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def _round(stub, mds, *, stale_from=None):
    """Every device downloads its adapter and uploads it slightly moved (a real accepted update)."""
    for i, md in enumerate(mds):
        t = stub.GetTask(pb.TaskRequest(), metadata=md)
        assert t.state == pb.Task.TRAIN, t
        blob = b"".join(c.data for c in stub.DownloadGlobal(
            pb.DownloadRequest(round_id=t.round_id, download_id=t.download_id), metadata=md))
        state = wire.decode_tensors(blob)[0]
        torch.manual_seed(i + 10 * t.round_id)
        data = wire.encode_tensors({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
        for nonce, uid in (([("stale", "s")] if i == stale_from else []) + [(t.nonce, "u")]):
            h = pb.UploadHeader(round_id=t.round_id, nonce=nonce, total_size=len(data), sha256=wire.sha256_hex(data),
                                kind=pb.LORA, upload_id=f"{uid}{t.round_id}", stats=pb.TrainStats(num_examples=8))
            try:
                stub.UploadUpdate(wire.upload_chunks(h, data), metadata=md)
            except grpc.RpcError as e:
                assert nonce == "stale" and e.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    from edge_runtime.data import load_sst2
    from edge_runtime.training.tiny import make_tiny_bert

    tmp = tmp_path_factory.mktemp("dash")
    model = make_tiny_bert(tmp / "bert", hidden=32, vocab_size=300)
    ev = tmp / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=32)))
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp / "store"), strategy="zero_pad", rounds=2,
                                      min_devices=3, max_rank=4, eval_data=str(ev), eval_limit=32))
    server, port = create_server("127.0.0.1:0", c, tick_interval_s=0.1)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pbg.FederationStub(channel)
    mds = []
    for name, prof, plan in DEVICES:
        profile = load_profile(ROOT / "profiles" / prof).to_dict()
        reg = stub.Register(pb.RegisterRequest(profile_json=json.dumps(profile), plan_json=json.dumps(plan),
                                               device_name=name))
        mds.append([("authorization", f"Bearer {reg.device_token}")])
    _round(stub, mds, stale_from=1)
    _round(stub, mds)
    srv, http_port = start_ops_server(c, "127.0.0.1", 0)
    yield {"c": c, "url": f"http://127.0.0.1:{http_port}", "tmp": tmp}
    stop_ops_servers([srv])
    channel.close()
    server.stop(0)
    c.close()


def test_api_status(ops):
    code, ctype, body = _get(ops["url"] + "/api/status")
    assert code == 200 and ctype == "application/json"
    st = json.loads(body)
    assert st["federation"]["completed"] == 2 and st["federation"]["done"]
    devs = {d["name"]: d for d in st["devices"]}
    assert sorted(devs) == sorted(n for n, _, _ in DEVICES)
    j = devs["jetson-orin-nano"]
    assert (j["plan_rank"], j["assigned_rank"], j["mode"]) == (8, 4, "lora")  # capped by --max-rank 4
    assert j["plan"]["base_precision"] == "nf4" and j["plan"]["upload_precision"] == "fp16"
    assert j["profile"]["accelerator"] == "jetson" and j["profile"]["memory_total_bytes"] > 0
    assert devs["raspberry-pi-5"]["assigned_rank"] == 2 and devs["raspberry-pi-5"]["plan"]["base_precision"] == "int8"
    assert all(d["accepted_updates"] == 2 and d["upload_bytes"] > 0 and d["active"] for d in devs.values())
    assert [r["state"] for r in st["rounds"]] == ["aggregated", "aggregated"]
    assert all(r["loss"] is not None and r["accuracy"] is not None and r["duration_s"] >= 0 for r in st["rounds"])
    assert "loss" in st["initial"] and st["last_eval"]["round_id"] == 2
    t = st["totals"]
    updates = ops["c"].store.updates()
    assert t["accepted_updates"] == 6 and t["upload_bytes"] == sum(u["wire_bytes"] for u in updates)
    assert t["download_bytes"] > 0 and t["rejected"] == {"replay": 1} and t["rejected_total"] == 1
    (r,) = st["rejections"]
    assert r["reason"] == "replay" and "nonce" in r["detail"]
    code, ctype, body = _get(ops["url"] + "/metrics")
    assert code == 200 and b"edgefed_rounds_completed_total 2.0" in body


def test_page_is_self_contained(ops):
    code, ctype, body = _get(ops["url"] + "/")
    assert code == 200 and ctype.startswith("text/html")
    html = body.decode()
    assert "api/status" in html and "<svg" in html
    assert "http://" not in html and "https://" not in html  # no CDN: works without internet
    with pytest.raises(urllib.error.HTTPError) as ei:
        _get(ops["url"] + "/nope")
    assert ei.value.code == 404


def test_page_in_headless_chromium(ops):
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = find_chromium()
    if exe is None:
        pytest.skip("no system Chromium (apt-get install chromium, or set EDGEFED_CHROMIUM); "
                    "the test never downloads a browser")
    from PIL import Image

    shot = ops["tmp"] / "dashboard.png"
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(ops["url"] + "/", timeout=30_000)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            text = page.inner_text("body")
            points = page.eval_on_selector_all("#acc circle", "els => els.length")
            loss_line = page.get_attribute("#loss polyline", "points")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    for name, _, _ in DEVICES:
        assert name in text
    assert "aggregated" in text and "replay" in text and "nf4" in text
    assert "does not match the task issued" in text  # the rejection's detail is listed
    assert points == 3 and len(loss_line.split()) == 3  # initial + two rounds
    img = Image.open(shot).convert("RGB")
    assert img.width >= 1000 and img.height >= 800
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "screenshot looks blank"
    dominant = max(colors)[0] / (img.width * img.height)
    assert dominant < 0.9, f"screenshot is {dominant:.0%} one colour"


def test_cli_serve_exposes_ops_endpoints(ops, tmp_path):
    """`edge-coordinator serve --metrics-port P --dashboard-port P` in a real process."""
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    grpc_port, http_port = ports
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(grpc_port), "--model", str(ops["tmp"] / "bert"), "--store", str(tmp_path / "s"),
                             "--max-rank", "4", "--insecure", "--keep-serving", "--metrics-port", str(http_port),
                             "--dashboard-port", str(http_port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def metrics_body() -> bytes:
            assert proc.poll() is None, f"the coordinator exited with {proc.returncode}:\n{proc.stdout.read()}"
            return _get(f"http://127.0.0.1:{http_port}/metrics")[2]

        body = wait_until(metrics_body, timeout=60, interval=0.3, ignore=(OSError,),
                          what="the coordinator's /metrics to answer")
        assert b"edgefed_devices_registered 0.0" in body, body
        st = json.loads(_get(f"http://127.0.0.1:{http_port}/api/status")[2])
        assert st["devices"] == [] and st["config"]["max_rank"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
