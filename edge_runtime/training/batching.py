"""Encoding records into token ids, length-bucketed batching and dynamic padding.

Batches are padded to their longest sequence (not to `seq_len`), and examples of similar
length are grouped: each window of `batch_size * BUCKET_BATCHES` shuffled examples is sorted
by length, cut into batches, and the batches are shuffled. On SST-2 (mean ~13 tokens) this
is ~3x faster than fixed-length padding.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BUCKET_BATCHES = 32
IGNORE = -100


@dataclass
class Example:
    """One encoded example. Classification: `label` is the class id and `labels` is None.
    Causal LM: `labels` has -100 on prompt tokens; `prompt_len` is where the response starts."""

    input_ids: list[int]
    label: int | None = None
    labels: list[int] | None = None
    prompt_len: int = 0


def encode_classification(tok: Any, records: Sequence[dict[str, Any]], seq_len: int) -> list[Example]:
    enc = tok([r["text"] for r in records], truncation=True, max_length=seq_len)["input_ids"]
    return [Example(list(ids), label=int(r["label"])) for ids, r in zip(enc, records)]


def _user_text(rec: dict[str, Any]) -> str:
    return rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "input_ids"):
        x = x["input_ids"]
    return [int(i) for i in x]


def encode_instructions(tok: Any, records: Sequence[dict[str, Any]], seq_len: int) -> list[Example]:
    """Prompt via the chat template (generation prompt added), response + end-of-turn as targets.

    Templates are rendered to text and tokenized in one batch call. Long examples keep the
    response (up to seq_len//2 tokens) and drop prompt tokens from the left.
    """
    if getattr(tok, "chat_template", None):
        users = [[{"role": "user", "content": _user_text(r)}] for r in records]
        prompts = [tok.apply_chat_template(u, add_generation_prompt=True, tokenize=False) for u in users]
        fulls = [tok.apply_chat_template(u + [{"role": "assistant", "content": r["output"]}], tokenize=False)
                 for u, r in zip(users, records)]
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        f_ids = tok(fulls, add_special_tokens=False)["input_ids"]
    else:
        p_ids = tok([f"### Instruction:\n{_user_text(r)}\n### Response:\n" for r in records])["input_ids"]
        f_ids = [p + o + [tok.eos_token_id] for p, o in
                 zip(p_ids, tok([r["output"] for r in records], add_special_tokens=False)["input_ids"])]
    out = []
    for rec, prompt, full in zip(records, p_ids, f_ids):
        prompt, full = list(prompt), list(full)
        if full[: len(prompt)] != prompt:  # template not prefix-stable: fall back to concatenation
            full = prompt + _ids(tok(rec["output"], add_special_tokens=False)) + [tok.eos_token_id]
        out.append(_truncate(prompt, full[len(prompt):], seq_len, rec.get("label")))
    return out


def _truncate(prompt: list[int], resp: list[int], seq_len: int, label: int | None) -> Example:
    if len(prompt) + len(resp) > seq_len:
        resp = resp[: max(1, min(len(resp), seq_len // 2))]
        prompt = prompt[-(seq_len - len(resp)):] if seq_len > len(resp) else prompt[-1:]
    return Example(prompt + resp, label=label, labels=[IGNORE] * len(prompt) + resp, prompt_len=len(prompt))


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of index batches, length-bucketed, reproducible in `seed`."""
    n = len(lengths)
    if n == 0:
        raise ValueError("no training examples")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        window = batch_size * BUCKET_BATCHES
        for start in range(0, n, window):
            chunk = sorted(perm[start:start + window], key=lambda i: lengths[i])
            batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            for j in torch.randperm(len(batches), generator=g).tolist():
                yield batches[j]
        epoch += 1


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """All indices once, sorted by length, in batches."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids/attention_mask (B, T); labels (B,) or (B, T)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    out["input_ids"], out["attention_mask"] = ids.to(device), mask.to(device)
    if examples[0].labels is not None:
        lab = torch.full((B, T), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            lab[i, : len(e.labels)] = torch.tensor(e.labels)
        out["labels"] = lab.to(device)
        out["prompt_len"] = torch.tensor([e.prompt_len for e in examples], device=device)
    else:
        out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long, device=device)
    return out
