"""One secure-aggregation round driven over gRPC: phase timing around a `SecAggServer`.

Devices call SecAggStep once per phase with their message, then poll (empty payload) until the
phase closes. A phase closes when every device still in the protocol that is alive has sent its
message, or when the phase deadline passes (the round's training deadline for the first phase,
then `phase_timeout_s` after the previous close). Devices missing at a close have dropped out;
the `SecAggServer` recovers them (or aborts below the threshold).

`global_from_sum` turns the unmasked sum into the round's aggregate for the linear methods.
The coordinator never holds an individual device's unmasked input, and stores nothing per device.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from protos.adapter import A_SUFFIX, B_SUFFIX
from protos.secagg import AdvertiseKeys, MaskedInput, SecAggError, ShareKeys, UnmaskShares
from protos.secagg_payload import RoundPayload, unpack_average, zo_pairs_from_sum

from . import rounds as R
from .aggregation import GlobalState, LoraUpdate, zo_replay_update
from .engine import RoundEngine
from .methods import METHODS, Method, method_class
from .secagg_server import SecAggResult, SecAggServer

log = logging.getLogger("coordinator.secagg")
PHASES = ("advertise", "share_keys", "masked_input", "unmask")  # index = SecAggPhase - 1
_MESSAGES = (AdvertiseKeys, ShareKeys, MaskedInput, UnmaskShares)
MAX_MASKED_INPUT_BYTES = 1 << 30  # one device's masked input (sent in chunks): 268 M values


class SecAggRejected(R.RoundError):
    """A SecAggStep the protocol refuses (wrong phase, excluded device, malformed or inconsistent message)."""

    code = "FAILED_PRECONDITION"
    reason = "other"


@dataclass(frozen=True)
class SecAggSettings:
    """`--secagg` options. threshold 0: a majority of the selected devices (at least 2)."""

    threshold: int = 0
    neighbours: int | None = None
    clip: float = 8.0
    phase_timeout_s: float = 60.0
    weight_cap: int = 0  # 0: local_steps x the largest plan batch of the selected devices

    def threshold_for(self, n_selected: int) -> int:
        if self.threshold:
            return self.threshold
        t = max(2, n_selected // 2 + 1)
        return min(t, self.neighbours + 1) if self.neighbours else t


def check_method_supports_secagg(name: str) -> None:
    """Raise ValueError unless method `name`'s aggregate is linear in what devices send (a weighted SUM)."""
    why = method_class(name).secagg_refusal
    if why:
        ok = [n for n, cls in METHODS.items() if cls.secagg_refusal is None]
        raise ValueError(f"strategy {name!r} cannot run under secure aggregation: {why}. "
                         f"Use one of {tuple(ok)} or turn secure aggregation off.")


def check_secagg_config(strategy: str, s: SecAggSettings, min_devices: int, defences_active: bool) -> None:
    """Raise ValueError naming the option that cannot run under secure aggregation, and what to do."""
    check_method_supports_secagg(strategy)
    if min_devices < 2:
        raise ValueError(f"--secagg needs --min-devices >= 2 (got {min_devices}): masks only hide one device's "
                         "update among several")
    if s.threshold and not 2 <= s.threshold <= min_devices:
        raise ValueError(f"--secagg-threshold {s.threshold} must be in [2, --min-devices={min_devices}] so every "
                         "round can reach it; use 0 for a majority of the selected devices")
    if s.neighbours is not None and (s.neighbours < 2 or s.neighbours % 2):
        raise ValueError(f"--secagg-neighbours must be an even number >= 2 (SecAgg+ ring graph), got {s.neighbours}")
    if s.neighbours and s.threshold > s.neighbours + 1:
        raise ValueError(f"--secagg-threshold {s.threshold} exceeds --secagg-neighbours + 1 ({s.neighbours + 1}): "
                         "each secret is shared only among a device and its neighbours")
    if not (math.isfinite(s.clip) and s.clip > 0):
        raise ValueError(f"--secagg-clip must be a positive number, got {s.clip}")
    if not s.phase_timeout_s > 0:
        raise ValueError(f"--secagg-phase-timeout must be positive seconds, got {s.phase_timeout_s}")
    if s.weight_cap < 0:
        raise ValueError(f"--secagg-weight-cap must be >= 0 (0 = automatic), got {s.weight_cap}")
    if defences_active:
        raise ValueError("--secagg cannot be combined with --robust / --clip-norm / --dp-noise on the coordinator: "
                         "they need each device's individual update, and secure aggregation only reveals the sum. "
                         "Clip and add noise on the devices instead")


ZO_LR_REF = 5e-4  # scalars' lr unit when --zo-lr leaves each device its plan's lr (edge_runtime Plan default)


@dataclass(frozen=True)
class ZOScalars:
    """Seed-scalar secure aggregation for the zo strategy: the round's shared pool and units.
    lr_ref: the learning rate the coordinator replays with (devices scale their g by lr / lr_ref);
    value_scale: g is divided by it so that sums of projected gradients fit the clip range."""

    pool_seed: int
    pool_size: int
    lr_ref: float
    value_scale: float = 16.0


def round_payload(g: GlobalState, method: Method, ranks: Iterable[int], weight_cap: int,
                  zo: ZOScalars | None = None, weight_temper: float = 1.0, loss_weight: float = 0.0,
                  num_labels: int = 0) -> RoundPayload:
    """The public payload description of a round: the global adapter's keys at the global rank, or
    (an all-ZO method, one rank, a pool smaller than the adapter) the seed-scalar mode."""
    ranks = [int(r) for r in ranks]
    cfg = method.cfg
    state = RoundEngine(method, g, 0).download(cfg.max_rank, "lora", 0)
    only_a = not method.shares_b
    keys = sorted(k for k in state if not (only_a and k.endswith(B_SUFFIX)))
    layout = tuple((k, tuple(int(d) for d in state[k].shape)) for k in keys)
    scales = {cfg.scale(r) for r in ranks}
    rp = RoundPayload(layout=layout, weight_cap=float(weight_cap), fold_scale=not only_a and len(scales) > 1,
                      ignore_extra=only_a, changes=not method.factor_space, weight_temper=weight_temper,
                      loss_weight=loss_weight, num_labels=num_labels)
    if zo is not None and method.all_zo and len(set(ranks)) == 1 and zo.pool_size + 1 < rp.vector_len:
        rp = replace(rp, zo_pool_seed=zo.pool_seed, zo_pool_size=zo.pool_size, zo_lr_ref=zo.lr_ref,
                     zo_value_scale=zo.value_scale, changes=False)
    return rp


def secagg_message_cap(vector_len: int) -> int:
    """Largest secure-aggregation message a device may send this round: its masked input (4 raw
    bytes per value) plus header room; the Shamir-share messages are far smaller."""
    return 4 * int(vector_len) + (1 << 20)


def check_message_size(rp: RoundPayload) -> None:
    """Masked inputs travel in chunks of one gRPC message each; refuse only layouts whose masked
    input alone would exceed MAX_MASKED_INPUT_BYTES (the coordinator holds one per device in flight)."""
    need = secagg_message_cap(rp.vector_len)
    if need > MAX_MASKED_INPUT_BYTES:
        raise ValueError(f"secure aggregation of {rp.vector_len} values needs about {need / 2**20:.0f} MiB per masked "
                         f"input, above the {MAX_MASKED_INPUT_BYTES >> 20} MiB limit; lower --max-rank, "
                         "target fewer modules (--target-modules) or turn --secagg off")


def global_from_sum(total: np.ndarray, rp: RoundPayload, method: Method, ranks: Iterable[int],
                    g: GlobalState, round_id: int = 0) -> GlobalState:
    """The round's aggregate from the unmasked sum: the weighted average, as `RoundEngine.close` gives it.

    Scales: when the payload folded each device's scale into B the average has scale 1.0; otherwise
    every selected device had the same scale s, which the average keeps. A method that keeps B on
    the devices gets its upload completed (`Method.complete_upload`) before it finalises.
    g: the current global (the round's start).
    """
    if rp.zo_scalars:  # the weighted average of the ZO devices' replays = one replay of the averaged scalars
        rank = int(next(iter(ranks)))
        pairs, weight = zo_pairs_from_sum(total, rp)
        start = RoundEngine(method, g, 0).download(rank, "zo", 0)
        avg = zo_replay_update(start, pairs, rp.zo_lr_ref)
    else:
        avg, weight = unpack_average(total, rp.payload_layout)
    bad = [k for k, t in avg.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"unmasked sum has non-finite values in {bad[:3]}")
    scale = 1.0
    if method.shares_b and not rp.fold_scale:
        scale = method.cfg.scale(int(next(iter(ranks))))
    if rp.changes:  # the average change, added to the global (at the payload's scale)
        avg = _plus_global(avg, g, scale)
    avg = method.complete_upload(avg, g, round_id)
    mods: dict[str, LoraUpdate] = {}
    for key in [k for k in avg if k.endswith(A_SUFFIX)]:
        mod = key[: -len(A_SUFFIX)]
        step = LoraUpdate(A=avg[key], B=avg[mod + B_SUFFIX], scale=scale, weight=weight)  # A (R, in), B (out, R)
        mods[mod], _ = method.finalise(g.modules[mod], step, round_id)
    extra = {k: v for k, v in sorted(avg.items()) if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))}
    return GlobalState(method.name, mods, extra, weight)


def _plus_global(avg: dict[str, torch.Tensor], g: GlobalState, scale: float) -> dict[str, torch.Tensor]:
    """global + average change, key by key: A (R, in), B (out, R) at `scale`, extras."""
    out = {}
    for k, d in avg.items():
        if k.endswith(A_SUFFIX):
            out[k] = g.modules[k[: -len(A_SUFFIX)]].A + d
        elif k.endswith(B_SUFFIX):
            u = g.modules[k[: -len(B_SUFFIX)]]
            out[k] = (u.B.double() * (u.scale / scale) + d.double()).float()
        else:
            out[k] = g.extra[k] + d
    return out


@dataclass
class SecAggRound:
    """Phase bookkeeping of one round around a SecAggServer (not thread-safe: the Coordinator's lock guards it)."""

    round_id: int
    payload: RoundPayload
    server: SecAggServer
    deadline: float  # when the current phase closes at the latest
    phase_timeout_s: float
    phase: int = 0  # index into PHASES of the phase being collected
    members: set[str] = field(default_factory=set)  # devices still in the protocol
    sent: dict[int, set[str]] = field(default_factory=lambda: {i: set() for i in range(4)})
    outputs: dict[int, object] = field(default_factory=dict)  # phase -> its result (broadcast or per device)
    result: SecAggResult | None = None
    abort_reason: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    started: float | None = None
    finished_at: float | None = None

    @classmethod
    def open(cls, round_id: int, selected: Iterable[str], payload: RoundPayload, settings: SecAggSettings,
             deadline: float) -> "SecAggRound":
        ids = sorted(selected)
        srv = SecAggServer(ids, settings.threshold_for(len(ids)), payload.vector_len, round_id=round_id,
                           clip=settings.clip, neighbours=settings.neighbours)
        return cls(round_id, payload, srv, deadline, settings.phase_timeout_s, members=set(ids))

    @property
    def done(self) -> bool:
        return self.result is not None or bool(self.abort_reason)

    def check_open(self, device_id: str, phase: int) -> None:
        """Raise SecAggRejected unless `device_id` may send its `phase` (0-based) message now."""
        if self.abort_reason:
            raise SecAggRejected(f"round {self.round_id}: secure aggregation aborted: {self.abort_reason}")
        if phase != self.phase:
            where = "closed" if phase < self.phase else "not open yet"
            raise SecAggRejected(f"round {self.round_id}: secure-aggregation phase {PHASES[phase]!r} is {where} "
                                 f"(now at {PHASES[self.phase] if not self.done else 'done'!r}); this device is "
                                 "out of the round, pick up the next one with GetTask")
        if device_id not in self.members:
            raise SecAggRejected(f"device {device_id} dropped out of round {self.round_id}'s secure aggregation")

    def submit(self, device_id: str, phase: int, data: bytes, now: float) -> None:
        """Record a device's message for `phase` (0-based). Re-sent messages are ignored (retries)."""
        if device_id in self.sent[phase] and not self.abort_reason:
            return
        self.check_open(device_id, phase)
        try:
            msg = _MESSAGES[phase].from_bytes(data)
            if getattr(msg, "device_id", device_id) != device_id:
                raise SecAggError(f"message names device {msg.device_id!r}, the caller is {device_id!r}")
            getattr(self.server, ("receive_advertise", "receive_share_keys", "receive_masked_input",
                                  "receive_unmask")[phase])(msg)
        except (ValueError, SecAggError) as e:
            raise SecAggRejected(f"round {self.round_id}: {PHASES[phase]} message refused: {e}") from None
        if self.started is None:
            self.started = now
        self.sent[phase].add(device_id)
        self.bytes_in += len(data)

    def reply(self, device_id: str, phase: int) -> bytes | None:
        """This device's result of `phase`, or None while the phase is open."""
        if phase >= self.phase and phase < 3 and not self.done:
            return None
        if device_id not in self.sent[phase]:
            raise SecAggRejected(f"round {self.round_id}: device {device_id} sent nothing in phase {PHASES[phase]!r}")
        if phase == 3:
            return b""  # unmasking shares received: this device is done with the round
        if phase not in self.outputs:
            if self.result is None:
                raise SecAggRejected(f"round {self.round_id}: secure aggregation aborted: {self.abort_reason}")
            out = b""  # unmask: the sum is unmasked, nothing to return
        else:
            res = self.outputs[phase]
            if isinstance(res, Mapping):
                if device_id not in res:
                    raise SecAggRejected(f"device {device_id} is not in round {self.round_id}'s key-sharing set")
                res = res[device_id]
            out = res.to_bytes()
        self.bytes_out += len(out)
        return out

    def advance(self, now: float, alive: set[str]) -> None:
        """Close the current phase when every live member has sent, or at its deadline."""
        while not self.done:
            waiting = (self.members & alive) - self.sent[self.phase]
            if waiting and now < self.deadline:
                return
            self._close_phase(now)

    def _close_phase(self, now: float) -> None:
        srv, p = self.server, self.phase
        try:
            if p == 0:
                self.outputs[0] = srv.close_advertise()
            elif p == 1:
                self.outputs[1] = srv.close_share_keys()
            elif p == 2:
                self.outputs[2] = srv.close_masked_input()
            else:
                self.result, self.finished_at = srv.finish(), now
                return
        except SecAggError as e:  # SecAggAbort: too few devices left
            self.abort_reason = str(e)
            self.finished_at = now
            return
        missing = sorted(self.members - self.sent[p])
        if missing:
            log.info("round %d: secure aggregation phase %s closed without %s", self.round_id, PHASES[p], missing)
        self.members = set(self.sent[p])
        self.phase = p + 1
        self.deadline = now + self.phase_timeout_s

    def metrics(self) -> dict[str, float]:
        """Round metrics: protocol bytes (payloads both ways), seconds from the first message to the end."""
        secs = (self.finished_at or 0.0) - (self.started or self.finished_at or 0.0)
        out = {"secagg_bytes_in": self.bytes_in, "secagg_bytes_out": self.bytes_out, "secagg_seconds": secs,
               "secagg_threshold": self.server.params.threshold, "secagg_vector_len": self.payload.vector_len}
        if self.result is not None:
            out.update(secagg_survivors=len(self.result.survivors), secagg_dropped=len(self.result.dropped))
        return out
