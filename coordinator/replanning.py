"""Re-planning devices during a federation (`Replanner`, one per Coordinator; --replan).

After each round closes, the selected devices' rank and local steps are re-fitted to the round
deadline from the reports their uploads carried (coordinator.replan's pure time model); a
straggler whose late upload is refused is re-fitted at once from that upload's report. A device
that stepped down after an out-of-memory reports its new plan, and is never assigned above it.
Every method runs under the coordinator's lock.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import rounds as R
from .replan import RoundReport, rank_after_report, replan, reported_plan

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator")


class Replanner:
    """Per-device local steps (when re-planned) and the rank/steps re-fits of --replan."""

    def __init__(self, c: Coordinator):
        self.c = c
        self.steps: dict[str, int] = {}  # device -> local steps when re-planned (--replan)

    def local_steps(self, device_id: str, mode: str) -> int:
        """This device's local steps: the re-planned value (scaled for ZO devices) or the configured one."""
        cfg = self.c.cfg
        base = (cfg.zo_local_steps or cfg.local_steps) if mode == "zo" else cfg.local_steps
        k = self.steps.get(device_id)
        return base if k is None else max(1, round(base * k / cfg.local_steps))

    def note_plan(self, device_id: str, stats: dict[str, Any]) -> None:
        """A device that stepped down after an out-of-memory reports its new plan: never assign above it."""
        c = self.c
        plan = reported_plan(stats or {})
        dev = c.fed.devices.get(device_id)
        if plan is None or dev is None or plan["rank"] >= dev.plan_rank:
            return
        if c.method.common_rank:
            log.warning("device %s stepped down to rank %d but strategy %s trains one common rank %d", device_id,
                        plan["rank"], c.cfg.strategy, dev.assigned_rank)
            return
        plan_rank, assigned = rank_after_report(dev.plan_rank, dev.assigned_rank, plan["rank"])
        c.fed.devices[device_id] = replace(dev, plan_rank=plan_rank, assigned_rank=assigned)
        c.store.event("plan_stepped_down", None, device_id, plan_rank=plan_rank, assigned=assigned)
        log.info("device %s stepped down: plan rank %d -> %d, assigned rank %d", device_id, dev.plan_rank, plan_rank,
                 assigned)

    def after_round(self, rnd: R.Round) -> None:
        """Re-fit the selected devices' rank and local steps to the deadline (coordinator.replan)."""
        c = self.c
        stats = {u["device_id"]: u["stats"] for u in c.store.updates(rnd.round_id)}
        devs = {d: c.fed.devices[d] for d in rnd.selected if d in c.fed.devices}
        reports = {d: RoundReport.from_stats(stats[d], devs[d].assigned_rank) if d in stats else None for d in devs}
        new = self._refit(reports, devs)
        c.store.event("replan", rnd.round_id, assignments={d: list(v) for d, v in new.items()})
        log.info("round %d re-planned (rank, steps): %s", rnd.round_id, new)

    def late(self, device_id: str, round_id: int, stats: dict[str, Any]) -> None:
        """Re-fit one straggler from the report its refused late upload carried."""
        dev = self.c.fed.devices.get(device_id)
        rep = RoundReport.from_stats(stats, dev.assigned_rank) if dev else None
        if rep is None:
            return
        rank, steps = self._refit({device_id: rep}, {device_id: dev})[device_id]
        self.c.store.event("replan", round_id, device_id, assignments={device_id: [rank, steps]}, late=True,
                           reported_train_s=rep.train_time_s, reported_steps=rep.steps)
        log.info("round %d: late device %s re-planned from its report (%.1fs for %d steps): rank %d, %d steps",
                 round_id, device_id, rep.train_time_s, rep.steps, rank, steps)

    def _refit(self, reports: dict[str, RoundReport | None], devs: dict[str, R.Device]) -> dict[str, tuple[int, int]]:
        """Re-plan `devs` from `reports` (coordinator.replan.replan) and apply the result."""
        cfg = self.c.cfg
        current = {d: (dev.assigned_rank, self.steps.get(d, cfg.local_steps)) for d, dev in devs.items()}
        new = replan(reports, cfg.round_timeout_s, current, plan_ranks={d: v.plan_rank for d, v in devs.items()},
                     target_steps=cfg.local_steps, max_rank=cfg.max_rank, margin=cfg.replan_margin)
        self._apply(new)
        return new

    def _apply(self, new: dict[str, tuple[int, int]]) -> None:
        """Next rounds' local steps per device, and its rank unless the strategy needs one common rank."""
        common = self.c.method.common_rank
        for d, (rank, steps) in new.items():
            self.steps[d] = steps
            if not common:
                self.c.fed.devices[d] = replace(self.c.fed.devices[d], assigned_rank=rank)
