"""The coordinator (`edge-coordinator serve`, a subprocess) is SIGKILLed mid-round and restarted on
the same store and port: it resumes the open round, no accepted update is lost, and the two
device processes (`edge-runtime join`) reconnect by themselves and finish every round."""
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from test_reliability_support import ENV, ROOT, free_port, spawn_serve, tiny_model
from waiting import wait_until


def _accepted(store) -> set[tuple[int, str, str]]:
    db = sqlite3.connect(f"file:{store / 'coordinator.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return set(db.execute("SELECT round_id, device_id, sha256 FROM updates").fetchall())
    finally:
        db.close()


def _open_round(store) -> int | None:
    db = sqlite3.connect(f"file:{store / 'coordinator.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT round_id FROM rounds WHERE state='open' ORDER BY round_id DESC LIMIT 1").fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


def test_sigkill_mid_round_resumes_without_losing_updates(tmp_path):
    from edge_runtime.data import load_sst2

    model = tiny_model(tmp_path)
    recs = load_sst2("train", limit=200)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mode": "lora", "rank": 4, "target_modules": ["query", "value"], "batch_size": 8,
                                "seq_len": 32, "learning_rate": 5e-3}))
    store, port, log = tmp_path / "store", free_port(), tmp_path / "coordinator.log"
    serve_args = ["--host", "127.0.0.1", "--port", str(port), "--model", str(model), "--store", str(store),
                  "--strategy", "zero_pad", "--rounds", "3", "--min-devices", "2", "--local-steps", "3",
                  "--max-rank", "4", "--round-timeout", "120", "--heartbeat-timeout", "60", "--insecure"]
    coord, _ = spawn_serve(serve_args, log)
    devices = []
    for i in range(2):
        data = tmp_path / f"data{i}.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in recs[i * 100:(i + 1) * 100]))
        cmd = [sys.executable, "-m", "edge_runtime.cli", "join", f"127.0.0.1:{port}", "--profile",
               str(ROOT / "profiles" / "laptop-cpu-16gb.yaml"), "--model", str(model), "--data", str(data),
               "--plan", str(plan), "--insecure", "--threads", "1", "--name", f"dev{i}", "--state-dir",
               str(tmp_path / f"dev{i}"), "--retry-attempts", "40"]
        if i == 1:
            cmd += ["--uplink-mbps", "0.02"]  # ~2 s per upload: leaves a window with one update accepted
        devices.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(tmp_path / f"dev{i}.log", "w"),
                                        stderr=subprocess.STDOUT))
    dev_logs = [tmp_path / f"dev{i}.log" for i in range(2)]
    try:
        def round_with_one_accepted_update() -> int | None:
            rid = _open_round(store) if (store / "coordinator.sqlite").exists() else None
            return rid if rid and rid >= 2 and sum(r == rid for r, _, _ in _accepted(store)) == 1 else None

        killed_in = wait_until(round_with_one_accepted_update, timeout=150, interval=0.03,
                               what="round >= 2 with one accepted update", diagnose=lambda: log.read_text()[-2000:])
        before = _accepted(store)
        t_kill = time.time()
        log_sizes = [f.stat().st_size for f in dev_logs]
        coord.send_signal(signal.SIGKILL)
        coord.wait()
        # a device has seen the coordinator gone (UNAVAILABLE: retrying / resuming) before it comes back
        wait_until(lambda: any(b"UNAVAILABLE" in f.read_bytes()[n:] for f, n in zip(dev_logs, log_sizes)),
                   timeout=60, interval=0.05, what="a device to see the coordinator UNAVAILABLE",
                   diagnose=lambda: "\n".join(f.read_text(errors="replace")[-1500:] for f in dev_logs))
        coord, _ = spawn_serve(serve_args, log)
        restart_s = time.time() - t_kill
        for i, p in enumerate(devices):
            rc = p.wait(timeout=150)
            assert rc == 0, f"device {i} failed:\n{(tmp_path / f'dev{i}.log').read_text()[-3000:]}"
        assert coord.wait(timeout=60) == 0
    finally:
        for p in devices + [coord]:
            if p.poll() is None:
                p.kill()
    after = _accepted(store)
    db = sqlite3.connect(store / "coordinator.sqlite")
    states = [s for (s,) in db.execute("SELECT state FROM rounds ORDER BY round_id")]
    resumes = db.execute("SELECT count(*) FROM events WHERE kind='resume'").fetchone()[0]
    db.close()
    dev_rounds = [[json.loads(x)["round_id"] for x in (tmp_path / f"dev{i}" / "rounds.jsonl").read_text().splitlines()]
                  for i in range(2)]
    print(f"\nSIGKILL in round {killed_in} with {len(before)} accepted updates on disk; coordinator back after "
          f"{restart_s:.1f}s; accepted before kill still present: {len(before & after)}/{len(before)}; "
          f"rounds {states}; updates now {len(after)}; device rounds {dev_rounds}")
    assert before <= after  # 0 accepted updates lost (same round, device and sha256)
    assert states == ["aggregated"] * 3 and resumes == 1 and len(after) == 6
    assert all(r == [1, 2, 3] for r in dev_rounds)
    assert "resumed store" in log.read_text()
