"""`edge-runtime join` against a real coordinator that refuses the device: a clean message and exit 2
(the coordinator's reason, not a traceback)."""
from pathlib import Path

from coordinator.server import create_server
from coordinator.service import Coordinator, CoordinatorConfig
from edge_runtime.cli import main
from edge_runtime.plan import Plan
from test_reliability_support import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_join_refused_by_the_coordinator_exits_2_with_its_reason(tmp_path, capsys):
    model = tiny_model(tmp_path)
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "store"), strategy="zo", max_rank=8,
                                      min_devices=1, rounds=1))
    server, port = create_server("127.0.0.1:0", c)
    server.start()
    try:
        (tmp_path / "plan.json").write_text(Plan(rank=4, target_modules=["query", "value"]).to_json())
        (tmp_path / "d.jsonl").write_text('{"text": "good", "label": 1}\n')
        rc = main(["join", f"127.0.0.1:{port}", "--insecure", "--profile", str(ROOT / "profiles" / "laptop-cpu-16gb.yaml"),
                   "--model", str(model), "--data", str(tmp_path / "d.jsonl"), "--plan", str(tmp_path / "plan.json"),
                   "--max-rounds", "1"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "the coordinator answered FAILED_PRECONDITION" in err and "--max-rank 4" in err
        assert "Traceback" not in err
    finally:
        server.stop(0)
        c.close()
