"""Rank self-pruning (HetLoRA, Cho et al. 2024): after local training a device drops the trailing
rank slots of its adapter while they carry at most a `threshold` share of its product B A.

Slot i of a LoRA module is row i of A (r, in) and column i of B (out, r). Slots, not singular
directions, are pruned: the coordinator aggregates slot by slot (zero-padding), so the kept slots
must stay where they are. The share of slots [k:] is ||B[:, k:] A[k:]||_F / ||B A||_F, computed from
the two r x r Gram matrices (no out x in product is formed). The download's `DeviceContract`
carries the threshold (0: off); the device runtime never branches on a method's name.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, State

log = logging.getLogger(__name__)


def tail_shares(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(r + 1,) shares: entry k is ||B[:, k:] A[k:]||_F / ||B A||_F (entry 0 is 1, entry r is 0; all 0
    when B A = 0). A: (r, in), B: (out, r)."""
    ga = A.double() @ A.double().T  # (r, r)
    gb = B.double().T @ B.double()  # (r, r)
    prod = ga * gb  # trace(gb[k:, k:] ga[k:, k:]) = sum of this block (both symmetric)
    r = int(A.shape[0])
    total = float(prod.sum())
    out = torch.zeros(r + 1, dtype=torch.float64)
    if total <= 0.0:
        return out
    for k in range(r):
        out[k] = max(float(prod[k:, k:].sum()), 0.0) / total
    return out.sqrt()


def pruned_rank(state: Mapping[str, torch.Tensor], threshold: float, min_rank: int = 1) -> int:
    """The smallest rank k >= min_rank whose dropped slots [k:] carry at most `threshold` of B A in
    every LoRA module of `state` (keys `<module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r)).
    threshold 0: the current rank r (nothing is pruned)."""
    mods = [(state[k], state[k[: -len(A_SUFFIX)] + B_SUFFIX]) for k in sorted(state) if k.endswith(A_SUFFIX)]
    if not mods:
        raise ValueError("pruned_rank: the adapter state has no LoRA modules (no '*.lora_A.weight' keys)")
    r = int(mods[0][0].shape[0])
    if threshold <= 0.0:
        return r
    worst = torch.stack([tail_shares(A, B) for A, B in mods]).max(dim=0).values  # (r + 1,)
    ok = [k for k in range(max(1, min_rank), r + 1) if float(worst[k]) <= threshold]
    return ok[0] if ok else r


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (rank ** 0.5 if use_rslora else rank)


def prune_state(state: Mapping[str, torch.Tensor], rank: int, old_scale: float, new_scale: float) -> State:
    """`state` at `rank`: A[:rank] (rank, in), B[:, :rank] * old_scale / new_scale (out, rank), so
    that new_scale B' A' equals old_scale times the kept slots' product; other keys unchanged."""
    out: State = {}
    for k, v in state.items():
        if k.endswith(A_SUFFIX):
            out[k] = v[:rank].clone()
        elif k.endswith(B_SUFFIX):
            out[k] = (v[:, :rank] * (old_scale / new_scale)).clone()
        else:
            out[k] = v.clone()
    return out


def prune_trainer(trainer: Any, threshold: float) -> int | None:
    """Prune a trained `RoundTrainer` in place: its adapter rebuilt at the pruned rank with the kept
    slots loaded, its plan's rank lowered to it. Returns the new rank, or None when nothing was pruned."""
    if threshold <= 0.0:
        return None
    state = trainer.adapter_state()
    old = int(trainer.rank)
    new = pruned_rank(state, threshold)
    if new >= old:
        return None
    alpha, rslora = float(trainer.lora_alpha), bool(trainer.use_rslora)
    pruned = prune_state(state, new, lora_scale(alpha, old, rslora), lora_scale(alpha, new, rslora))
    trainer.configure(rank=new, lora_alpha=alpha, use_rslora=rslora)
    trainer.load_adapter_state(pruned)
    trainer.plan = replace(trainer.plan, rank=min(int(trainer.plan.rank), new),
                           rank_pattern={k: min(v, new) for k, v in trainer.plan.rank_pattern.items()})
    log.info("rank self-pruning: rank %d -> %d (dropped slots carry <= %.2f of B A)", old, new, threshold)
    return new
