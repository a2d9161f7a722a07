"""Round state machine, free of I/O: enrolment, selection, deadlines, quorum, stragglers.

Everything here is a dataclass plus pure functions of (state, now); the coordinator service
persists what changes. Policy, in one place:

- selection: at round open, the available devices (heard from within `heartbeat_timeout_s`)
  are sampled with `fraction` (at least `min_devices`, deterministic in the round seed);
  fewer than `min_devices` available -> the round does not open yet.
- a round closes when every selected device has uploaded or dropped out (no heartbeat for
  `heartbeat_timeout_s`), or at its deadline. It is aggregated if the accepted uploads reach
  `quorum` (fraction of the selected, at least one); otherwise it FAILS, the global state is
  unchanged and a new round opens (failed rounds do not count toward `total_rounds`).
- stragglers: an upload for a round that is no longer open is rejected (FAILED_PRECONDITION)
  and counted in that round's `late`; the device simply picks up the next round.
- assigned rank = min(plan rank, max_rank); strategies with one common rank (fedavg, zo)
  refuse devices whose plan rank is below it.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from .errors import CoordinatorError

OPEN, AGGREGATED, FAILED = "open", "aggregated", "failed"


class RoundError(CoordinatorError):
    """Base of the round state machine's refusals (coordinator.errors: `reason` label, gRPC `code`)."""

    code = "FAILED_PRECONDITION"


class UnknownDevice(RoundError):
    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class WrongRound(RoundError):
    """Wrong or unknown round / download; raised with reason="replay" for a stale or replayed nonce."""

    code = "FAILED_PRECONDITION"
    reason = "wrong_round"


class LateUpload(WrongRound):
    """Upload for a round that has closed (a straggler)."""

    reason = "late"


class NotSelected(RoundError):
    code = "FAILED_PRECONDITION"
    reason = "not_selected"


class DuplicateUpload(RoundError):
    code = "ALREADY_EXISTS"
    reason = "duplicate"


class EnrolmentRefused(RoundError):
    code = "FAILED_PRECONDITION"
    reason = "bad_plan"


@dataclass(frozen=True)
class RoundConfig:
    """Federation policy. Times in seconds."""

    total_rounds: int = 3
    min_devices: int = 1
    fraction: float = 1.0
    quorum: float = 1.0
    round_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 120.0
    max_rank: int = 8
    strategy: str = ""  # the method's name (messages only)
    common_rank: bool = False  # the method trains one rank on every device (`Method.common_rank`)
    seed: int = 0
    cohorts: int = 1  # > 1: each round selects one cohort (`cohort`; RoundPolicy.cohorts), not a fraction

    def __post_init__(self) -> None:
        if self.cohorts > 1 and self.fraction < 1.0:
            raise ValueError(f"round config cohorts={self.cohorts} with fraction={self.fraction}: choose one "
                             "(cohorts already train a 1/cohorts share each round)")
        for name in ("total_rounds", "min_devices", "max_rank", "cohorts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"round config {name}={v!r}: expected an integer >= 1")
        for name in ("fraction", "quorum"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"round config {name}={v!r}: expected a fraction in (0, 1]")
        for name in ("round_timeout_s", "heartbeat_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"round config {name}={getattr(self, name)!r}: expected a positive number of seconds")


@dataclass(frozen=True)
class Device:
    device_id: str
    name: str
    plan_rank: int
    mode: str  # "lora" | "zo": what the device's plan runs
    assigned_rank: int
    last_seen: float
    registered_at: float


@dataclass(frozen=True)
class Round:
    round_id: int
    opened_at: float
    deadline: float
    selected: tuple[str, ...]
    nonces: dict[str, str]
    accepted: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    late: int = 0
    state: str = OPEN
    closed_at: float | None = None

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(d for d in self.selected if d not in self.accepted and d not in self.dropped)


def assign_rank(plan_rank: int, cfg: RoundConfig) -> int:
    """The rank asked of a device: never above its plan, never above max_rank.

    Raises EnrolmentRefused for a common-rank method when the plan cannot hold max_rank.
    """
    if plan_rank < 1:
        raise EnrolmentRefused(f"plan rank {plan_rank} is invalid: expected >= 1")
    if cfg.common_rank and plan_rank < cfg.max_rank:
        raise EnrolmentRefused(
            f"strategy {cfg.strategy!r} trains one common rank {cfg.max_rank}, but this device's plan allows only "
            f"rank {plan_rank}; start the coordinator with --max-rank {plan_rank} or a rank-heterogeneous strategy")
    return min(plan_rank, cfg.max_rank)


def enrol(devices: dict[str, Device], device_id: str, name: str, plan_rank: int, mode: str,
          cfg: RoundConfig, now: float) -> Device:
    """A new or returning device (same name keeps its id). Pure: returns the record to store."""
    rank = assign_rank(plan_rank, cfg)
    old = next((d for d in devices.values() if d.name == name), None)
    return Device(device_id=old.device_id if old else device_id, name=name, plan_rank=plan_rank, mode=mode,
                  assigned_rank=rank, last_seen=now, registered_at=old.registered_at if old else now)


def available(devices: dict[str, Device], cfg: RoundConfig, now: float) -> list[str]:
    """Ids of devices heard from within heartbeat_timeout_s, sorted."""
    return sorted(d.device_id for d in devices.values() if now - d.last_seen <= cfg.heartbeat_timeout_s)


def cohort(candidates: list[str], cohorts: int, seed: int, round_id: int) -> tuple[str, ...]:
    """Round `round_id`'s (1-based) group: slice (round_id - 1) % cohorts of the candidates shuffled once per
    pass of `cohorts` rounds (deterministic in seed and pass): over a pass every device trains once. Fewer
    candidates than cohorts: one device a round, in turn (never an empty group)."""
    p, i = divmod(max(0, round_id - 1), cohorts)
    order = sorted(candidates)
    random.Random(seed * 1_000_003 + 7919 * p + 1).shuffle(order)
    k = max(1, min(cohorts, len(order)))
    return tuple(sorted(order[i % k::k]))


def select(candidates: list[str], cfg: RoundConfig, round_id: int) -> tuple[str, ...]:
    """ceil(fraction * n) of the candidates (at least min_devices), deterministic in (seed, round); with
    `cohorts` > 1 the round's cohort instead (`cohort`)."""
    if len(candidates) < cfg.min_devices:
        return ()
    if cfg.cohorts > 1:
        return cohort(candidates, cfg.cohorts, cfg.seed, round_id)
    k = min(len(candidates), max(cfg.min_devices, math.ceil(cfg.fraction * len(candidates))))
    rng = random.Random(cfg.seed * 1_000_003 + round_id)
    return tuple(sorted(rng.sample(sorted(candidates), k)))


def open_round(devices: dict[str, Device], cfg: RoundConfig, round_id: int, now: float,
               nonce_of: dict[str, str]) -> Round | None:
    """A new round over the selected devices, or None when too few are available.

    nonce_of: device id -> fresh nonce (generated by the caller, which owns randomness).
    """
    chosen = select(available(devices, cfg, now), cfg, round_id)
    if not chosen:
        return None
    return Round(round_id=round_id, opened_at=now, deadline=now + cfg.round_timeout_s, selected=chosen,
                 nonces={d: nonce_of[d] for d in chosen})


def check_upload(rnd: Round | None, round_id: int, device_id: str, nonce: str) -> None:
    """Raise the domain error that refuses this upload, or return if it may be accepted."""
    if rnd is None or round_id < rnd.round_id:
        current = rnd.round_id if rnd else "none"
        raise LateUpload(f"round {round_id} is closed (current round: {current}); late uploads are "
                         "rejected, pick up the next round with GetTask")
    if round_id > rnd.round_id:
        raise WrongRound(f"round {round_id} does not exist yet (current round: {rnd.round_id})")
    if rnd.state != OPEN:
        raise LateUpload(f"round {round_id} is {rnd.state}; late uploads are rejected, pick up the next round")
    if device_id not in rnd.selected:
        raise NotSelected(f"device {device_id} is not selected for round {round_id}")
    if device_id in rnd.accepted:
        raise DuplicateUpload(f"device {device_id} already has an accepted upload for round {round_id}")
    if nonce != rnd.nonces.get(device_id):
        raise WrongRound(f"nonce {nonce!r} does not match the task issued for round {round_id}; "
                         "call GetTask again (replayed or stale upload)", reason="replay")


def accept(rnd: Round, device_id: str) -> Round:
    return replace(rnd, accepted=rnd.accepted + (device_id,), dropped=tuple(d for d in rnd.dropped if d != device_id))


def count_late(rnd: Round) -> Round:
    return replace(rnd, late=rnd.late + 1)


def mark_dropouts(rnd: Round, devices: dict[str, Device], cfg: RoundConfig, now: float) -> Round:
    """Selected devices that went silent (no heartbeat for heartbeat_timeout_s) are dropped."""
    gone = tuple(d for d in rnd.pending
                 if d not in devices or now - devices[d].last_seen > cfg.heartbeat_timeout_s)
    return replace(rnd, dropped=rnd.dropped + gone) if gone else rnd


def quorum_size(rnd: Round, cfg: RoundConfig) -> int:
    return max(1, math.ceil(cfg.quorum * len(rnd.selected) - 1e-9))


def should_close(rnd: Round, now: float) -> bool:
    """Every selected device answered (upload or dropout), or the deadline passed."""
    return rnd.state == OPEN and (not rnd.pending or now >= rnd.deadline)


def close(rnd: Round, cfg: RoundConfig, now: float) -> Round:
    """AGGREGATED if the accepted uploads reach quorum, else FAILED."""
    ok = len(rnd.accepted) >= quorum_size(rnd, cfg)
    return replace(rnd, state=AGGREGATED if ok else FAILED, closed_at=now)


@dataclass
class Federation:
    """Mutable holder the service keeps in memory (rebuilt from the store on restart)."""

    cfg: RoundConfig
    devices: dict[str, Device] = field(default_factory=dict)
    current: Round | None = None
    completed: int = 0  # aggregated rounds
    last_round_id: int = 0

    @property
    def done(self) -> bool:
        return self.completed >= self.cfg.total_rounds
