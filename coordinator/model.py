"""The coordinator's own view of the base model: the initial global adapter and evaluation.

Kept independent of edge_runtime (the two packages never import each other); it builds
the adapter the same way a device does: transformers head seeded with `seed`, peft LoRA at
max_rank with the head in `modules_to_save`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protos.model_load import LOAD_LOCK, ensure_output_head
from protos.pooling import use_checkpoint_pooling
from protos.sparse import SPARSE_SUFFIX

HEAD_NAMES = ("classifier", "score")
TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("qkv_proj",))
PEFT_PREFIX = "base_model.model."


def resolve_model_source(model: str | Path) -> tuple[Path, dict[str, str]]:
    """(directory, extra from_pretrained kwargs) for an HF dir, a .gguf file or a dir holding one.

    GGUF files are dequantized to float32 by transformers (`gguf_file=`)."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if path.is_dir():
        if (path / "config.json").exists():
            return path, {}
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return path, {"gguf_file": ggufs[0].name}
    raise FileNotFoundError(f"--model {path} is neither a Hugging Face model directory (with config.json) nor a "
                            ".gguf file (or a directory holding one)")


def load_base_model(model_dir: str | Path, task: str, num_labels: int, seed: int) -> tuple[torch.nn.Module, Any]:
    """(model float32 CPU eval-mode, tokenizer). Classification heads are initialised under `seed`.

    model_dir: a Hugging Face model directory or a GGUF file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path, extra = resolve_model_source(model_dir)
    tok = AutoTokenizer.from_pretrained(path, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if task not in ("classification", "causal_lm"):
        raise ValueError(f"task {task!r} unknown; use 'classification' or 'causal_lm'")
    with LOAD_LOCK:  # transformers patches process globals while it loads (protos.model_load)
        torch.manual_seed(seed)
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                       dtype=torch.float32, **extra)
            use_checkpoint_pooling(model, path)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                               **extra)
            ensure_output_head(model, info.get("missing_keys", ()))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def resolve_target_modules(model: torch.nn.Module, requested: Sequence[str] | None) -> list[str]:
    """The requested targets, or the first known attention projection set the model has."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if requested:
        missing = [t for t in requested if t not in names]
        if missing:
            raise ValueError(f"target modules {missing} are not Linear layers of this model; some that are: "
                             f"{sorted(names)[:12]}")
        return list(requested)
    for cand in TARGET_CANDIDATES:
        if all(c in names for c in cand):
            return list(cand)
    raise ValueError(f"cannot pick LoRA target modules automatically; pass --target-modules (Linear layers: "
                     f"{sorted(names)[:12]})")


def initial_adapter_state(model: torch.nn.Module, target_modules: Sequence[str], rank: int, lora_alpha: float,
                          use_rslora: bool, seed: int, peft: str = "lora", virtual_tokens: int = 0,
                          bottleneck: int = 0) -> dict[str, torch.Tensor]:
    """peft adapter state at `rank` (A kaiming-uniform under `seed`, B zero) plus the head; for a
    non-LoRA `peft` (prompt / ia3 / bitfit / adapter) its trainable tensors by name (`protos.peft_types`)."""
    import copy

    if peft != "lora":
        from protos import peft_types

        wrapped = peft_types.build(copy.deepcopy(model), peft, virtual_tokens, seed, bottleneck)
        return {k: v.detach().float().clone() for k, v in peft_types.trainable(wrapped).items()}
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    heads = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=list(target_modules),
                     lora_dropout=0.0, bias="none", modules_to_save=heads or None)
    with LOAD_LOCK:  # the seed and the draws of the init stay together when threads load at once
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), cfg)
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


# -- evaluation -------------------------------------------------------------------------------
def load_eval_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """JSONL / CSV / TSV (optionally .gz) with text+label or instruction/input/output columns."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--eval-data {p} does not exist")
    raw = gzip.open(p, "rt") if p.suffix == ".gz" else open(p)
    with raw as f:
        text = f.read()
    base = p.name[:-3] if p.suffix == ".gz" else p.name
    if base.endswith(".jsonl") or base.endswith(".json"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if base.endswith(".tsv") else ","))
    out = []
    for r in rows:
        if "label" in r:
            out.append({"text": r.get("text", r.get("sentence", "")), "label": int(r["label"])})
        elif "output" in r:
            prompt = (r.get("instruction", "") + "\n" + r.get("input", "")).strip()
            out.append({"text": prompt + "\n" + r["output"]})
        elif "text" in r:
            out.append({"text": r["text"]})
    if not out:
        raise ValueError(f"--eval-data {p}: no usable rows (need text+label or instruction/output columns)")
    return out[:limit] if limit else out


@dataclass
class Evaluator:
    """Held-out loss / accuracy of the base model plus a global adapter (applied densely)."""

    model: torch.nn.Module
    tokenizer: Any
    records: list[dict[str, Any]]
    task: str = "classification"
    batch_size: int = 32
    max_len: int = 128

    def __post_init__(self) -> None:
        self._base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def evaluate(self, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 extra: Mapping[str, torch.Tensor], peft: str = "lora", virtual_tokens: int = 0,
                 bottleneck: int = 0) -> dict[str, float]:
        """deltas: module key (peft-prefixed) -> (B (out, r) scale folded, A (r, in)); extra: head tensors
        (a non-LoRA `peft`: all its trainable tensors by name, applied through the same wrapper as on devices)."""
        if peft != "lora":
            return self._evaluate_wrapped(extra, peft, virtual_tokens, bottleneck)
        state = {k: v.clone() for k, v in self._base.items()}
        for name, (B, A) in deltas.items():
            key = _strip(name) + ".weight"
            if key not in state:
                raise ValueError(f"global module {name!r} does not match a weight of the base model ({key})")
            state[key] += (B.double() @ A.double()).to(state[key].dtype)
        for name, t in extra.items():
            if name.endswith(SPARSE_SUFFIX):  # SLoRA's sparse delta: in `deltas` (coordinator.slora)
                continue
            key = _strip(name).replace(".modules_to_save.default", "")
            if key not in state:
                raise ValueError(f"global tensor {name!r} does not match a parameter of the base model ({key})")
            state[key] = t.to(state[key].dtype)
        self.model.load_state_dict(state)
        try:
            return self._run()
        finally:
            self.model.load_state_dict(self._base)

    def _evaluate_wrapped(self, tensors: Mapping[str, torch.Tensor], peft: str, virtual_tokens: int,
                          bottleneck: int = 0) -> dict[str, float]:
        """Metrics of the base wrapped in place for a non-LoRA PEFT type with `tensors` loaded, then
        unwrapped (in place: no copy of the base per evaluation, and hooks registered on the base
        stay bound to the model that runs)."""
        from protos import peft_types

        with torch.random.fork_rng():  # build() seeds its init: leave the caller's RNG alone
            model = peft_types.build(self.model, peft, virtual_tokens, bottleneck=bottleneck).eval()
        try:
            peft_types.load_state(model, tensors, f"global state ({peft})")
            return self._run(model)
        finally:
            self.model = peft_types.unload(model)
            self.model.load_state_dict(self._base)

    @torch.no_grad()
    def _run(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        model = self.model if model is None else model
        total_loss, correct, n = 0.0, 0, 0
        for i in range(0, len(self.records), self.batch_size):
            batch = self.records[i:i + self.batch_size]
            enc = self.tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            if self.task == "classification":
                labels = torch.tensor([r["label"] for r in batch])
                logits = model(**enc).logits
                total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
            else:
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                out = model(**enc, labels=labels)
                total_loss += float(out.loss) * len(batch)
            n += len(batch)
        res = {"loss": total_loss / max(n, 1), "n": float(n)}
        if self.task == "classification":
            res["accuracy"] = correct / max(n, 1)
        else:
            res["perplexity"] = math.exp(min(res["loss"], 50.0))
        return res


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def peft_export_files(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]], extra: Mapping[str, torch.Tensor],
                      target_modules: Sequence[str], base_model: str, task: str, peft: str = "lora",
                      virtual_tokens: int = 0, bottleneck: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """(adapter_config.json text, adapter_model tensors) for the global adapter, scale folded into B.

    Every module gets lora_alpha == its rank (scale 1); differing ranks go to rank_pattern/alpha_pattern.
    A non-LoRA `peft`: its tensors under `protos.peft_types` keys and a config naming the type (load
    them with `protos.peft_types.build` + `load_state`, not `PeftModel.from_pretrained`).
    """
    if peft != "lora":
        cfg = {"peft_type": peft.upper(), "base_model_name_or_path": str(base_model), "num_virtual_tokens":
               virtual_tokens, "bottleneck": bottleneck,
               "task_type": "SEQ_CLS" if task == "classification" else "CAUSAL_LM",
               "key_format": "protos.peft_types.trainable (adapter name stripped)"}
        return json.dumps(cfg, indent=2), {k: v.contiguous() for k, v in extra.items()}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (B, A) in deltas.items():
        tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = A.contiguous(), B.contiguous()
        ranks[_strip(name)] = int(A.shape[0])
    extra = {k: v for k, v in extra.items() if not k.endswith(SPARSE_SUFFIX)}  # SLoRA's: in `deltas`
    tensors.update({k: v.contiguous() for k, v in extra.items()})
    r = max(ranks.values()) if ranks else 1
    pattern = {k: v for k, v in ranks.items() if v != r}
    heads = sorted({_strip(k).split(".")[0] for k in extra})
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(base_model), "r": r, "lora_alpha": r,
           "rank_pattern": pattern, "alpha_pattern": dict(pattern), "target_modules": list(target_modules),
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "modules_to_save": heads or None,
           "task_type": "SEQ_CLS" if task == "classification" else "CAUSAL_LM", "inference_mode": True}
    return json.dumps(cfg, indent=2), tensors
