"""tools/bench_fleet.py end to end at toy size: a real `edge-coordinator serve` subprocess and gRPC devices."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_bench_fleet_smoke(tmp_path):
    from edge_runtime.training.tiny import make_tiny_bert

    import bench_fleet

    model = make_tiny_bert(tmp_path / "bert", hidden=32, vocab_size=300)
    results = bench_fleet.main(["--devices", "4", "--rounds", "2", "--model", str(model), "--out", str(tmp_path),
                                "--poll", "0.2", "--max-rank", "4", "--workers", "1", "--channels", "2",
                                "--timeout", "120"])
    (r,) = results
    assert r.failures == 0 and r.rounds == 2 and len(r.round_latency_s) == 2
    assert r.rss_peak_mib >= r.rss_start_mib > 50  # sampled from the coordinator process
    assert 0 < r.upload_bytes_per_device < r.download_bytes_per_device  # fp16 uploads of fp32 downloads
    saved = json.loads((tmp_path / "bench_fleet.json").read_text())
    assert saved["results"][0]["devices"] == 4
