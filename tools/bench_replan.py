#!/usr/bin/env python
"""Static ranks vs per-round re-planning (`edge-coordinator serve --replan`) under a tight deadline.

Runs the fleet emulation (tools/fleet.py: a real coordinator process + emulated device processes
on 127.0.0.1, compute paced to each profile's GFLOP/s) twice with the same seeds, once static and
once re-planned, and compares round wall time (p50/p95), dev accuracy per round and the uploads
that missed the deadline (refused as late, or never sent). Prints a table, writes JSON + PNG.

    python tools/bench_replan.py --out runs/bench_replan --json docs/bench_replan.json --png docs/bench_replan.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import fleet  # noqa: E402  (tools/fleet.py)

console = Console()
DEVICES = [{"profile": "profiles/emu-large-1200mb.yaml", "count": 2},
           {"profile": "profiles/emu-medium-700mb.yaml", "count": 1},
           {"profile": "profiles/emu-tiny-210mb.yaml", "count": 1}]  # 5 GFLOP/s, rank 2: the straggler


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[i]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Round wall times, accuracy per round and missed uploads from one fleet run's summary."""
    rounds = [r for r in result["rounds"] if r["round"] > 0]
    walls = [float(r["wall_s"]) for r in rounds if r.get("wall_s")]
    missed = 0
    per_round_missed: dict[int, int] = {}
    steps: dict[int, list[int]] = {}
    for d in result["devices"]:
        for rep in d["rounds"]:
            if not rep.get("accepted"):
                missed += 1
                per_round_missed[rep["round_id"]] = per_round_missed.get(rep["round_id"], 0) + 1
    dropped = sum(int(r.get("devices_dropped") or 0) for r in rounds)
    return {"round_wall_s": walls, "p50_wall_s": statistics.median(walls) if walls else float("nan"),
            "p95_wall_s": _pct(walls, 0.95), "accuracy": {int(r["round"]): r.get("accuracy") for r in result["rounds"]},
            "states": [r["state"] for r in rounds], "missed_uploads": missed, "dropped": dropped,
            "missed_per_round": per_round_missed, "aggregated": sum(r["state"] == "aggregated" for r in rounds),
            "total_wall_s": result["wall_s"], "steps": steps}


def always_available(devices: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Copies of the profiles with availability 1 and dropout 0, so both runs select the same
    devices every round and the comparison isolates the re-planning policy."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    res = []
    for d in devices:
        prof = yaml.safe_load((ROOT / d["profile"]).read_text())
        prof.update(availability=1.0, dropout=0.0)
        path = out / Path(d["profile"]).name
        path.write_text(yaml.safe_dump(prof, sort_keys=False))
        res.append({**d, "profile": str(path)})
    return res


def run_pair(args: argparse.Namespace) -> dict[str, Any]:
    devices = DEVICES if args.keep_availability else always_available(DEVICES, Path(args.out) / "profiles")
    if args.host_gflops is None:  # measured once: both runs must pace their devices alike
        args.host_gflops = round(fleet.host_gflops(), 1)
    out: dict[str, Any] = {"settings": vars(args).copy()}
    for name, extra in (("static", []), ("replan", ["--replan"])):
        cfg = fleet.FleetConfig(model=args.model, train_examples=args.train_examples, eval_examples=args.eval_examples,
                                strategy=args.strategy, rounds=args.rounds, local_steps=args.local_steps,
                                lr=1e-3, max_rank=args.max_rank, quorum=0.5, round_timeout_s=args.round_timeout,
                                heartbeat_timeout_s=args.heartbeat_timeout, devices=devices,
                                host_gflops=args.host_gflops,
                                extra_coordinator_args=extra)
        console.rule(f"{name}: deadline {args.round_timeout:.0f}s, {args.local_steps} local steps")
        res = fleet.run(cfg, Path(args.out) / name, args.timeout)
        out[name] = summarize(res)
        out[name]["device_rounds"] = {d["name"]: [{k: rep.get(k) for k in ("round_id", "rank", "train_s", "paced_s",
                                                                            "accepted")} for rep in d["rounds"]]
                                      for d in res["devices"]}
    return out


def table(res: dict[str, Any]) -> None:
    t = Table(title="static ranks vs re-planned (--replan)")
    for c in ("run", "rounds aggregated", "p50 round wall (s)", "p95 round wall (s)", "missed uploads",
              "dropped", "final accuracy"):
        t.add_column(c)
    for name in ("static", "replan"):
        s = res[name]
        acc = [v for _, v in sorted(s["accuracy"].items()) if v is not None]
        t.add_row(name, str(s["aggregated"]), f"{s['p50_wall_s']:.1f}", f"{s['p95_wall_s']:.1f}",
                  str(s["missed_uploads"]), str(s["dropped"]), f"{100 * acc[-1]:.1f}%" if acc else "-")
    console.print(t)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, m in (("static", "o"), ("replan", "s")):
        s = res[name]
        acc = sorted((k, v) for k, v in s["accuracy"].items() if v is not None)
        a1.plot([k for k, _ in acc], [100 * v for _, v in acc], marker=m, label=name)
        a2.plot(range(1, len(s["round_wall_s"]) + 1), s["round_wall_s"], marker=m, label=name)
    a2.axhline(res["settings"]["round_timeout"], color="grey", ls="--", label="deadline")
    a1.set_xlabel("round"), a1.set_ylabel("dev accuracy (%)"), a1.legend(), a1.grid(alpha=0.3)
    a2.set_xlabel("round"), a2.set_ylabel("round wall time (s)"), a2.legend(), a2.grid(alpha=0.3)
    fig.suptitle("static ranks vs per-round re-planning (tight deadline)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--strategy", default="zero_pad")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-availability", action="store_true",
                    help="keep the profiles' emulated availability/dropout (default: every device always online)")
    ap.add_argument("--host-gflops", type=float, default=None,
                    help="one host thread's fp32 GFLOP/s to pace against (default: measured once per run)")
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--max-rank", type=int, default=8)
    ap.add_argument("--round-timeout", type=float, default=45.0)
    ap.add_argument("--heartbeat-timeout", type=float, default=15.0)
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=600.0, help="per run")
    ap.add_argument("--out", default="runs/bench_replan")
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench_replan.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "bench_replan.png"))
    args = ap.parse_args(argv)
    res = run_pair(args)
    table(res)
    Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    plot(res, Path(args.png))
    console.print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
