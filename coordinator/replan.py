"""Per-round re-planning: fit each device's next rank and local steps to the round deadline.

Pure functions, no I/O. A device reports, with every upload, its measured train time (paced
compute included), steps, upload and download time and peak memory (`TrainStats`). The time
model for the next round at rank r and k steps, from a report taken at rank r0 and k0 steps:

    T(r, k) = k * train_time_s / k0  +  (upload_time_s + download_time_s) * r / r0

(compute per step is taken as rank-independent: activations dominate LoRA steps; the bytes
moved scale with the rank). `replan` picks, per device, the largest rank (<= what its plan
allows and the coordinator's max rank) and then the most steps (<= the target) with
T <= margin * deadline; steps never fall below `min_steps` nor rank below `min_rank`; a rank is
lowered only when even `min_steps` do not fit at the higher one. A selected device without a
report (it missed the deadline or dropped out) has its steps halved (then its rank).

`reported_plan(stats)` reads the plan a device reports after an out-of-memory step-down
(`TrainStats.extra_json = {"plan": {...}, "stepdown": [...]}`), so the next assignment never
exceeds it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoundReport:
    """One device's measurements for one round, at the rank and steps it was assigned."""

    rank: int
    steps: int
    train_time_s: float
    upload_time_s: float = 0.0
    download_time_s: float = 0.0
    peak_memory_bytes: int = 0

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], rank: int) -> "RoundReport | None":
        """From a stored TrainStats dict (proto field names); None when it carries no timing."""
        steps = int(stats.get("steps") or 0)
        t = float(stats.get("train_time_s") or 0.0)
        if steps < 1 or t <= 0:
            return None
        return cls(rank=max(1, int(rank)), steps=steps, train_time_s=t,
                   upload_time_s=float(stats.get("upload_time_s") or 0.0),
                   download_time_s=float(stats.get("download_time_s") or 0.0),
                   peak_memory_bytes=int(stats.get("peak_memory_bytes") or 0))

    def predict_s(self, rank: int, steps: int) -> float:
        """Predicted round time at `rank` and `steps` (see the module's time model)."""
        comm = (self.upload_time_s + self.download_time_s) * rank / self.rank
        return steps * self.train_time_s / self.steps + comm


def _ranks(cap: int, floor: int) -> list[int]:
    """cap, cap/2, ... down to floor (inclusive), descending."""
    out, r = [], cap
    while r > floor:
        out.append(r)
        r //= 2
    return out + [floor]


def replan(reports: Mapping[str, RoundReport | None], deadline_s: float, current: Mapping[str, tuple[int, int]], *,
           plan_ranks: Mapping[str, int], target_steps: int, max_rank: int, margin: float = 0.8, min_steps: int = 1,
           min_rank: int = 1) -> dict[str, tuple[int, int]]:
    """{device: (rank, local_steps)} for the next round, for every device in `current`.

    current: device -> (rank, steps) of the round just closed; reports: device -> its report
    (missing or None: no upload this round); plan_ranks: the largest rank each device's plan allows.
    """
    if deadline_s <= 0 or not 0 < margin <= 1:
        raise ValueError(f"replan: deadline_s={deadline_s} must be > 0 and margin={margin} in (0, 1]")
    if target_steps < 1 or min_steps < 1 or min_rank < 1:
        raise ValueError("replan: target_steps, min_steps and min_rank must be >= 1")
    budget = margin * deadline_s
    out: dict[str, tuple[int, int]] = {}
    for dev, (rank, steps) in current.items():
        cap = max(1, min(int(plan_ranks.get(dev, rank)), max_rank))
        floor_r = min(min_rank, cap)
        floor_k = min(min_steps, target_steps)
        rep = reports.get(dev)
        if rep is None:  # missed the deadline or dropped: ask for less
            k = max(floor_k, steps // 2)
            r = min(cap, rank if k < steps else max(floor_r, rank // 2))
            out[dev] = (r, k)
            continue
        choice = None
        for r in _ranks(cap, floor_r):
            per_step = rep.train_time_s / rep.steps
            comm = rep.predict_s(r, 0)
            k = min(target_steps, math.floor((budget - comm) / per_step)) if per_step > 0 else target_steps
            if k >= floor_k:
                choice = (r, k)
                break
        out[dev] = choice or (floor_r, floor_k)
    return out


def reported_plan(stats: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan a device reports in `extra_json` after stepping down, or None."""
    raw = stats.get("extra_json") or ""
    if not raw:
        return None
    try:
        extra = json.loads(raw)
    except (TypeError, ValueError):
        return None
    plan = extra.get("plan") if isinstance(extra, dict) else None
    if not isinstance(plan, dict) or not isinstance(plan.get("rank"), int) or plan["rank"] < 1:
        return None
    return plan


def rank_after_report(plan_rank: int, assigned_rank: int, reported_rank: int) -> tuple[int, int]:
    """(plan rank, assigned rank) after a device reports a plan of `reported_rank`: never above it."""
    new_plan = min(plan_rank, reported_rank)
    return new_plan, min(assigned_rank, new_plan)
