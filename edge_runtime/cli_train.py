"""`edge-runtime train | generate | export`: local training, text generation, adapter export."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MiB = 2**20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA adapter locally on a data file, within the plan")
    p.add_argument("--model", required=True, help="HF model dir, or a .gguf file / dir")
    p.add_argument("--data", required=True, help="JSONL / CSV / TSV (optionally .gz)")
    p.add_argument("--plan", required=True, help="plan.json from `edge-runtime plan --json`")
    p.add_argument("--out", required=True, help="output dir for the peft adapter and train_metrics.json")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: plan.local_steps)")
    p.add_argument("--task", choices=("auto", "classification", "causal_lm"), default="auto")
    p.add_argument("--num-labels", type=int, default=None, help="classes (default: max label + 1, at least 2)")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 2GiB or bytes; 0 disables "
                                                 "(default: the plan's memory.budget_bytes)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N records")
    p.add_argument("--eval-data", default=None, help="evaluate on this file after training")
    p.add_argument("--quant-backend", choices=("auto", "bnb", "quanto"), default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with a causal LM (+ optional adapter), chat template")
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", default=None, help="peft adapter dir written by `train`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--json", action="store_true")
    g.add_argument("--debug", action="store_true")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="turn an adapter state (.safetensors, e.g. from the coordinator) "
                                      "into a peft adapter dir")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter-state", required=True, help=".safetensors with peft state-dict keys")
    e.add_argument("--plan", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--task", choices=("classification", "causal_lm"), default="classification")
    e.add_argument("--num-labels", type=int, default=2)
    e.add_argument("--lora-alpha", type=float, default=None, help="default: file metadata, else the plan's")
    e.add_argument("--json", action="store_true")
    e.add_argument("--debug", action="store_true")
    e.set_defaults(func=cmd_export)


def _is_causal_model(model: str) -> bool:
    from edge_runtime.training.model_loading import resolve_source

    directory, gguf = resolve_source(model)
    if gguf:
        return True
    cfg = json.loads((directory / "config.json").read_text())
    archs = cfg.get("architectures") or []
    return bool(archs) and all(a.endswith("ForCausalLM") for a in archs)


def _budget(arg: str | None, plan: Any) -> int | None:
    from edge_runtime.profile import parse_bytes

    if arg is None:
        b = int((plan.memory or {}).get("budget_bytes") or 0)
    else:
        b = parse_bytes(arg, "--budget")
    return b or None


def cmd_train(args: argparse.Namespace) -> int:
    from edge_runtime.data import load_records, record_kind
    from edge_runtime.plan import Plan
    from edge_runtime.training.guard import MemoryBudgetExceeded
    from edge_runtime.training.model_loading import TrainTask
    from edge_runtime.training.session import LocalTrainer

    plan = Plan.load(args.plan)
    records = load_records(args.data)[: args.limit or None]
    kind = args.task
    if kind == "auto":
        kind = "causal_lm" if record_kind(records[0]) == "instruction" or _is_causal_model(args.model) else "classification"
    num_labels = args.num_labels or max(2, 1 + max((r.get("label", 0) or 0) for r in records))
    task = TrainTask(kind=kind, num_labels=num_labels)
    budget = _budget(args.budget, plan)
    steps = args.steps or plan.local_steps
    out = Path(args.out)
    trainer = LocalTrainer(args.model, plan, task, memory_budget_bytes=budget, seed=args.seed, threads=args.threads,
                           quant_backend=args.quant_backend)
    metrics: dict[str, Any] = {"task": kind, "num_labels": num_labels, "rank": trainer.rank,
                               "lora_alpha": trainer.lora_alpha, "use_rslora": trainer.use_rslora,
                               "records": len(records), "budget_bytes": budget, "plan": plan.to_dict()}
    try:
        result = trainer.train(records, steps, lr=args.lr, seed=args.seed, progress=not (args.no_progress or args.json),
                               checkpoint_dir=out)
    except MemoryBudgetExceeded as e:
        metrics["train"] = e.result.to_dict() if e.result is not None else None
        metrics["error"] = str(e)
        _write_metrics(out, metrics)
        raise
    metrics["train"] = result.to_dict()
    if args.eval_data:
        metrics["eval"] = trainer.evaluate(load_records(args.eval_data))
    _write_metrics(out, metrics)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    else:
        _print_summary(out, metrics)
    return 0


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))


def _print_summary(out: Path, m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = m["train"]
    tab = Table(title=f"edge-runtime train -> {out}")
    tab.add_column("metric")
    tab.add_column("value", justify="right")
    rows = [("task", m["task"]), ("rank", m["rank"]), ("steps", t["steps"]), ("examples seen", t["examples_seen"]),
            ("loss first -> last", f"{t['loss_first']:.4f} -> {t['loss_last']:.4f}"), ("seconds", f"{t['seconds']:.1f}"),
            ("peak RSS", f"{t['peak_rss_bytes'] / MiB:.0f} MiB")]
    if "eval" in m:
        rows.append(("eval accuracy / loss", f"{m['eval']['accuracy']:.4f} / {m['eval']['loss']:.4f}"))
    for k, v in rows:
        tab.add_row(k, str(v))
    Console().print(tab)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from edge_runtime.plan import Plan
    from edge_runtime.training.model_loading import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base(args.model, Plan(), "causal_lm")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    text = generate_text(model, tok, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text}))
    else:
        print(text)
    return 0


def generate_text(model: Any, tok: Any, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy completion of one user turn through the tokenizer's chat template."""
    import torch

    msgs = [{"role": "user", "content": prompt}]
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        input_ids, mask = ids["input_ids"], ids["attention_mask"]
    else:
        enc = tok(prompt, return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from edge_runtime.plan import Plan
    from edge_runtime.training.model_loading import TrainTask
    from edge_runtime.training.session import LocalTrainer
    from protos.adapter import A_SUFFIX

    plan = Plan.load(args.plan)
    with safe_open(args.adapter_state, "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    ranks = {k[: -len(A_SUFFIX)]: int(v.shape[0]) for k, v in state.items() if k.endswith(A_SUFFIX)}
    if not ranks:
        raise ValueError(f"{args.adapter_state} holds no '*{A_SUFFIX}' tensors; expected a peft adapter state")
    rank = max(ranks.values())
    pattern = {k.removeprefix("base_model.model."): r for k, r in ranks.items() if r != rank}
    alpha = args.lora_alpha or float(meta.get("lora_alpha", plan.lora_alpha))
    rslora = str(meta.get("use_rslora", plan.use_rslora)).lower() == "true"
    plan = Plan.from_dict({**plan.to_dict(), "rank": rank, "rank_pattern": pattern, "lora_alpha": alpha,
                           "use_rslora": rslora, "base_precision": "fp32"})
    trainer = LocalTrainer(args.model, plan, TrainTask(args.task, args.num_labels))
    trainer.load_adapter_state(state)
    out = trainer.save_adapter(args.out)
    info = {"out": str(out), "rank": rank, "rank_pattern": pattern, "lora_alpha": alpha, "use_rslora": rslora}
    print(json.dumps(info) if args.json else f"wrote peft adapter to {out} (rank {rank}, alpha {alpha})")
    return 0

