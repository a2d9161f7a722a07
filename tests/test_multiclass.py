"""Any number of classes: a 4-class text-classification file through tools/bench_federated.py --data
and tools/fleet.py (real coordinator and device processes over gRPC), with a tiny random BERT."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def four_class_file(path: Path, n: int = 480) -> Path:
    """SST-2 rows relabelled into 4 classes: 2 * sentiment + (longer than 10 words)."""
    from edge_runtime.data import load_sst2

    rows = [{"text": r["text"], "label": 2 * int(r["label"]) + int(len(r["text"].split()) > 10)}
            for r in load_sst2("train", limit=n)]
    assert {r["label"] for r in rows} == {0, 1, 2, 3}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert

    d = tmp_path_factory.mktemp("four")
    return make_tiny_bert(d / "bert", hidden=32, vocab_size=400), four_class_file(d / "four.jsonl")


def test_bench_federated_derives_four_classes(tiny, tmp_path):
    model, data = tiny
    r = subprocess.run([sys.executable, str(ROOT / "tools/bench_federated.py"), "--quick", "--data", str(data),
                        "--model", str(model), "--strategies", "centralized,zero_pad,svd+zo", "--zo-devices", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_federated.json").read_text())
    fleet = doc["fleets"]["0"]
    assert all(len(d["label_shares"]) == 4 for d in fleet)  # the 4 classes, derived from the file
    assert len(fleet) == 11  # 10 LoRA profiles + the --zo-devices one (a tiny model fits backprop there too)
    for name in ("centralized", "zero_pad", "svd+zo"):
        acc = [x["mean"] for x in doc["summary"][name]["per_round"]]
        assert len(acc) == 3 and all(0.0 <= a <= 1.0 for a in acc)
    assert (tmp_path / "bench_federated.png").stat().st_size > 1000


def test_fleet_runs_a_four_class_file(tiny, tmp_path):
    model, data = tiny
    cfg = {"model": str(model), "data": str(data), "train_examples": 320, "eval_examples": 64,
           "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": 0}, "strategy": "zero_pad", "rounds": 1,
           "local_steps": 2, "max_rank": 4, "host_gflops": 1000.0, "round_timeout_s": 120.0,
           "devices": [{"profile": "profiles/emu-large-1200mb.yaml", "count": 1},
                       {"profile": "profiles/emu-medium-700mb.yaml", "count": 1}]}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "tools/fleet.py"), "--config", str(tmp_path / "fleet.yaml"),
                        "--out", str(tmp_path / "run"), "--timeout", "600"], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rounds = [x for x in summary["rounds"] if x["state"] == "aggregated"]
    assert rounds and 0.0 <= rounds[-1]["accuracy"] <= 1.0
    store_cfg = json.loads(subprocess.run([sys.executable, "-m", "coordinator.cli", "status", "--store",
                                           str(tmp_path / "run" / "store"), "--json"], capture_output=True,
                                          text=True, cwd=ROOT).stdout)["config"]
    assert store_cfg["num_labels"] == 4
