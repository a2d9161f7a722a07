"""Run a Flower federation of emulated devices in this process (no Ray) and print what happened.

    python tools/flower_sim.py --model DIR --strategy svd --rounds 3 \
        --profiles laptop-cpu-16gb raspberry-pi-5-8gb jetson-nano-4gb --max-rank 8 --out runs/flower.json

Each device plans from its profile (profiles/NAME.yaml or a path), trains on an IID shard of
SST-2 with LocalTrainer, and talks to HeteroLoraStrategy through Flower's ServerApp/ClientApp
(see coordinator/flower_loopback.py). Prints a table per device and per round; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/flower_sim.py` from anywhere
    sys.path.insert(0, str(ROOT))

from coordinator.methods.base import INITS  # noqa: E402
from coordinator.methods.registry import DEFAULT, NAMES  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (classification)")
    ap.add_argument("--strategy", default=DEFAULT, choices=NAMES, help="any registered method (coordinator.methods)")
    ap.add_argument("--prune-threshold", type=float, default=0.0,
                    help="hetlora's rank self-pruning: a device drops trailing slots carrying <= this share (0 = off)")
    ap.add_argument("--init", default="random", choices=INITS, help="round-1 LoRA factors (as serve's --init)")
    ap.add_argument("--slora-rounds", type=int, default=0, help="--init slora: sparse rounds before LoRA")
    ap.add_argument("--slora-density", type=float, default=0.0, help="--init slora: share of base entries trained")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profiles", nargs="+", default=["laptop-cpu-16gb", "raspberry-pi-5-8gb", "jetson-nano-4gb"])
    ap.add_argument("--caps", nargs="*", type=int, default=[], help="per-device rank caps (0 = none)")
    ap.add_argument("--max-rank", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--examples", type=int, default=64, help="SST-2 training examples shared out IID")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def make_nodes(a: argparse.Namespace) -> list:
    """One in-process Flower node per profile, each with its IID shard of SST-2 train (a temp JSONL)."""
    from coordinator.flower_loopback import Node
    from edge_runtime.data import load_sst2, partition
    from edge_runtime.flower_client import app

    tmp = Path(tempfile.mkdtemp(prefix="flower-sim-"))
    shards = partition(load_sst2("train", limit=a.examples), len(a.profiles), "iid", seed=0)
    nodes = []
    for i, (name, shard) in enumerate(zip(a.profiles, shards)):
        data = tmp / f"shard{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in shard))
        prof = name if name.endswith(".yaml") else str(ROOT / "profiles" / f"{name}.yaml")
        nc = {"model": a.model, "profile": prof, "data": str(data), "enforce-budget": False, "threads": 1}
        if i < len(a.caps) and a.caps[i] > 0:
            nc["max-rank"] = a.caps[i]
        nodes.append(Node(app, nc))
    return nodes


def print_report(report: dict, a: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"Flower federation ({a.strategy}, {a.rounds} rounds, {report['wall_s']:.1f}s, "
                    f"{report['messages']} messages)")
    for col in ("node", "profile", "plan", "assigned rank", "mode"):
        t.add_column(col)
    for d in report["devices"]:
        t.add_row(str(d["node"]), d["profile"], f"{d['plan_mode']} r{d['plan_rank']}", str(d["assigned_rank"]), d["mode"])
    con.print(t)
    r = Table(title="rounds")
    for col in ("round", "uploads", "zo", "rejected", "train loss", "aggregate s"):
        r.add_column(col)
    for m in report["rounds"]:
        r.add_row(str(m["round"]), str(m["uploads"]), str(m["zo_uploads"]), str(m["rejected"]),
                  f"{m.get('train_loss', float('nan')):.4f}", f"{m['aggregate_s']:.3f}")
    con.print(r)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import torch
    from flwr.server import ServerApp

    from coordinator.flower_loopback import run_inprocess
    from coordinator.flower_strategy import server_fn
    from edge_runtime.flower_client import cached_runtimes

    torch.set_num_threads(1)
    nodes = make_nodes(a)
    held = {}

    def fn(ctx):
        comps = server_fn(ctx)
        held["strategy"] = comps.server.strategy
        return comps

    run_config = {"model": a.model, "strategy": a.strategy, "num-server-rounds": a.rounds, "max-rank": a.max_rank,
                  "local-steps": a.local_steps, "min-clients": len(nodes), "max-workers": 1,
                  "prune-threshold": a.prune_threshold, "init": a.init, "slora-rounds": a.slora_rounds,
                  "slora-density": a.slora_density}
    t0 = time.perf_counter()
    grid = run_inprocess(ServerApp(server_fn=fn), nodes, run_config)
    wall = time.perf_counter() - t0
    strat = held["strategy"]
    rts = cached_runtimes()
    devices = [{"node": int(cid), "profile": info.profile, "plan_mode": rts[int(cid)].plan.mode,
                "plan_rank": info.plan_rank, "assigned_rank": info.rank, "mode": info.mode}
               for cid, info in sorted(strat.clients.items(), key=lambda x: int(x[0]))]
    report = {"strategy": a.strategy, "rounds": strat.rounds, "devices": devices, "refused": strat.refused,
              "messages": grid.messages_sent, "wall_s": wall}
    print_report(report, a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
