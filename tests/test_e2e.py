"""End to end: a real coordinator on 127.0.0.1:0 and three device PROCESSES
(`python -m edge_runtime.cli join ...`) with different plans (rank 4 LoRA, rank 8 LoRA, rank 4
zeroth-order) on a tiny random BERT, two rounds per strategy; the aggregated model's held-out
loss must improve over the initial model."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from protos.pooling import NORMALIZED_SCALE

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["fedavg", "zero_pad", "stack", "svd", "fedsa", "zo"]
PLANS = [  # (rank, mode): heterogeneous fleet; zo_seed_pool > 4096 keeps the seed pool cheap to build
    {"mode": "lora", "rank": 4}, {"mode": "lora", "rank": 8}, {"mode": "zo", "rank": 4}]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from edge_runtime.data import load_sst2
    from edge_runtime.training.tiny import make_tiny_bert
    from tests.test_pooling import write_sentence_pipeline

    tmp = tmp_path_factory.mktemp("e2e")
    model = make_tiny_bert(tmp / "bert", hidden=32, vocab_size=500)
    write_sentence_pipeline(model)  # both sides classify its normalized mean (protos.pooling)
    train = load_sst2("train", limit=900)
    shards = []
    for i in range(3):
        p = tmp / f"data{i}.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in train[i * 300:(i + 1) * 300]))
        shards.append(p)
    ev = tmp / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=200)))
    plans = []
    for i, spec in enumerate(PLANS):
        p = tmp / f"plan{i}.json"
        p.write_text(json.dumps({**spec, "target_modules": ["query", "value"], "batch_size": 16, "seq_len": 32,
                                 "learning_rate": 5e-3, "zo_seed_pool": 8192, "zo_eps": 1e-3}))
        plans.append(p)
    return {"tmp": tmp, "model": model, "shards": shards, "eval": ev, "plans": plans}


DEVICE_DRIVER = (
    "import json, sys\n"
    "from edge_runtime.cli import main\n"
    "rcs = [main(argv) for argv in json.loads(sys.argv[1])]\n"
    "sys.exit(max(rcs))\n")


@pytest.fixture(scope="module")
def federations(fleet):
    """One coordinator per strategy (all serving at once) and three device processes; each device
    process runs `edge-runtime join` against every coordinator in turn (one CLI run per strategy,
    so the heavy imports are paid once per process)."""
    tmp = fleet["tmp"]
    coords, servers, ports = {}, [], {}
    for s in STRATEGIES:
        cfg = CoordinatorConfig(model=str(fleet["model"]), store=str(tmp / s / "store"), strategy=s, rounds=2,
                                min_devices=3, round_timeout_s=240, local_steps=8, zo_local_steps=32, lr=1e-2,
                                zo_lr=3e-3, max_rank=4 if s in ("fedavg", "zo") else 8,
                                eval_data=str(fleet["eval"]), eval_limit=200, poll_interval_s=0.3)
        coords[s] = Coordinator(cfg)
        server, ports[s] = create_server("127.0.0.1:0", coords[s], tick_interval_s=0.2)
        server.start()
        servers.append(server)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    procs = []
    try:
        for i in range(3):
            runs = [["join", f"127.0.0.1:{ports[s]}", "--profile", str(ROOT / "profiles" / "laptop-cpu-16gb.yaml"),
                     "--model", str(fleet["model"]), "--data", str(fleet["shards"][i]), "--plan",
                     str(fleet["plans"][i]), "--insecure", "--threads", "1", "--name", f"dev{i}",
                     "--state-dir", str(tmp / s / f"dev{i}")] for s in STRATEGIES]
            procs.append(subprocess.Popen([sys.executable, "-c", DEVICE_DRIVER, json.dumps(runs)], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.time() + 400
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.time()))
            assert p.returncode == 0, f"device process failed (rc {p.returncode}):\n{err[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for server in servers:
            server.stop(0)
    yield coords
    for c in coords.values():
        c.close()


def _device_rounds(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_heterogeneous_fleet_two_rounds(fleet, federations, strategy):
    c = federations[strategy]
    rounds = c.store.rounds()
    initial = c.store.get_meta("initial_metrics")
    assert [r["state"] for r in rounds] == ["aggregated", "aggregated"]
    devices = sorted(c.store.summary()["devices"], key=lambda d: d["name"])
    common = strategy in ("fedavg", "zo")
    assert [d["assigned_rank"] for d in devices] == ([4, 4, 4] if common else [4, 8, 4])
    modes = ["zo"] * 3 if strategy == "zo" else ["lora", "lora", "zo"]
    for i, d in enumerate(devices):
        log = _device_rounds(fleet["tmp"] / strategy / f"dev{i}")
        assert [r["round_id"] for r in log] == [1, 2] and all(r["accepted"] for r in log)
        assert all(r["mode"] == modes[i] and r["train_s"] > 0 and r["peak_rss_bytes"] > 0 for r in log)
    kinds = sorted(u["kind"] for u in c.store.updates(2))
    assert kinds == (["ZO"] * 3 if strategy == "zo" else ["LORA", "LORA", "ZO"])
    losses = [initial["loss"]] + [r["metrics"]["loss"] for r in rounds]
    print(f"\n{strategy}: held-out loss {' -> '.join(f'{x:.4f}' for x in losses)}")
    if strategy == "zo":
        # zeroth-order only: the global moved (replayed seeds) and did not get worse beyond noise
        g0 = c.store.read_blob("rounds/0000/global.safetensors")
        g2 = c.store.read_blob("rounds/0002/global.safetensors")
        assert g0 != g2
        assert losses[-1] < losses[0] + 2e-3, f"zo: held-out loss got worse: {losses}"
    else:
        assert losses[-1] < losses[0], f"{strategy}: held-out loss did not improve: {losses}"
    peft_dir = Path(c.cfg.store) / "rounds" / "0002" / "peft"
    assert (peft_dir / "adapter_config.json").exists() and (peft_dir / "adapter_model.safetensors").exists()
    pooling = json.loads((peft_dir / "pooling.json").read_text())
    assert pooling["mode"] == "mean" and pooling["scale"] == NORMALIZED_SCALE
