"""`edge-runtime profile | plan | estimate`: measure the device, plan a fit, cost a plan."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from protos.peft_names import DEFAULT_BOTTLENECK, PEFT_TYPES

TASK_CHOICES = ("classification", "causal_lm")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="measure this device and print/save its profile")
    p.add_argument("--quick", action="store_true", help="short benchmarks (< 5 s)")
    p.add_argument("--out", help="write the profile as YAML to this path")
    p.add_argument("--coordinator", help="HOST:PORT to probe for latency (TCP connect)")
    p.add_argument("--bulk-mb", type=float, default=0.0, help="also time a bulk send of this many MB to --coordinator")
    p.add_argument("--name", help="profile name (default: host name)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser("plan", help="plan a fine-tuning configuration that fits a device profile")
    p.add_argument("--profile", required=True, help="profile YAML (profiles/*.yaml or from `edge-runtime profile`)")
    p.add_argument("--model", required=True, help="HF model dir, config-only dir, or GGUF file")
    p.add_argument("--task", choices=TASK_CHOICES, default=None, help="default: causal_lm for decoders, else classification")
    p.add_argument("--deadline", type=float, default=None, help="round deadline in seconds (default: the profile's)")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--examples", type=int, default=None, help="number of local training examples")
    p.add_argument("--peft", choices=PEFT_TYPES, default="lora",
                   help="PEFT type to plan: lora (default), prompt (prompt tuning), ia3 ((IA)3), bitfit (bias-only) or "
                        f"adapter (bottleneck adapters, width {DEFAULT_BOTTLENECK}); "
                        "a federation's download names the one its devices train")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", help="write the plan JSON here")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("estimate", help="predict the peak memory of training a plan")
    p.add_argument("--model", required=True, help="HF model dir, config-only dir, or GGUF file")
    p.add_argument("--plan", required=True, help="plan JSON")
    p.add_argument("--task", choices=TASK_CHOICES, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: CUDA peak allocated (no host overhead)")
    p.add_argument("--json", action="store_true", help="print the memory object as JSON")
    p.set_defaults(func=cmd_estimate)


def _default_task(spec: Any, task: str | None) -> str:
    return task or ("causal_lm" if spec.task_kind == "causal_lm" else "classification")


def cmd_profile(args: argparse.Namespace) -> int:
    from edge_runtime.measure import measure_device
    from edge_runtime.profile import save_profile

    prof = measure_device(quick=args.quick, coordinator=args.coordinator, bulk_bytes=int(args.bulk_mb * 1e6), name=args.name)
    if args.out:
        save_profile(prof, args.out)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"device profile: {prof.name}", show_header=False)
    for k, v in prof.to_dict().items():
        if k.endswith("_bytes"):
            v = f"{v / 2**30:.2f} GiB"
        t.add_row(k, str(v))
    Console().print(t)
    if args.out:
        print(f"saved to {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.planner import plan
    from edge_runtime.profile import load_profile

    prof = load_profile(args.profile)
    spec = load_model_spec(args.model)
    task = _default_task(spec, args.task)
    p = plan(prof, spec, task, round_deadline_s=args.deadline, local_steps=args.local_steps, data_examples=args.examples,
             peft=args.peft)
    if args.out:
        Path(args.out).write_text(p.to_json())
    if args.json:
        print(p.to_json())
        return 0
    _print_plan(p, prof.name, spec, task)
    if args.out:
        print(f"plan written to {args.out}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from edge_runtime.memory import estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan

    spec = load_model_spec(args.model)
    p = Plan.load(args.plan)
    task = _default_task(spec, args.task)
    budget = int(p.memory.get("budget_bytes", 0) or 0)
    overhead = 0 if args.device == "cuda" else p.memory.get("runtime_overhead_bytes")
    est = estimate(spec, p, task, overhead_bytes=overhead, budget_bytes=budget, device=args.device)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    _print_memory(est.to_dict(), f"estimated peak memory ({task}, {p.mode}, rank {p.rank}, {p.base_precision})")
    return 0


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_memory(mem: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    t.add_column("part")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    total = max(1, mem["total_bytes"])
    for k, v in sorted(mem["breakdown"].items(), key=lambda kv: -kv[1]):
        if v:
            t.add_row(k, _fmt(v), f"{100 * v / total:.0f}%")
    t.add_row("[bold]total[/bold]", f"[bold]{_fmt(mem['total_bytes'])}[/bold]", "")
    if mem.get("budget_bytes"):
        t.add_row("budget", _fmt(mem["budget_bytes"]), f"{100 * mem['total_bytes'] / mem['budget_bytes']:.0f}% used")
    Console().print(t)


def _print_plan(p: Any, profile_name: str, spec: Any, task: str) -> None:
    from rich.console import Console
    from rich.table import Table
    c = Console()
    t = Table(title=f"plan: {spec.architecture} {spec.n_params / 1e6:.0f}M ({task}) on {profile_name}", show_header=False)
    for k in ("peft", "mode", "rank", "target_modules", "base_precision", "compute_dtype", "batch_size", "seq_len",
              "gradient_checkpointing", "optimizer", "upload_precision", "local_steps"):
        t.add_row(k, str(getattr(p, k)))
    c.print(t)
    _print_memory(p.memory, "memory breakdown (predicted peak)")
    c.print("[bold]why[/bold]")
    for r in p.reasons:
        c.print(f"  - {r}")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (the real one is edge_runtime.cli)."""
    ap = argparse.ArgumentParser(prog="edge-runtime")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
