"""Secure aggregation over gRPC (`SecAggRounds`, one per Coordinator; --secagg).

Opens a round's SecAggRound (coordinator.secagg_round) with its payload layout and weight cap,
reassembles chunked SecAggStep messages, advances the protocol's phases on every tick and closes
the round once the masked sum is unmasked (its global published) or the protocol aborted. The
keys and the masked sum live only in memory: a coordinator restarted mid-round fails that round.
Every method except `step` runs under the coordinator's lock.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import rounds as R
from .errors import UploadRejected, UploadTooLarge
from .secagg_round import (ZO_LR_REF, SecAggRejected, SecAggRound, ZOScalars, global_from_sum, round_payload,
                           secagg_message_cap)

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator")


class SecAggRounds:
    """The secure aggregation of the open round (`current`), its chunks in flight, the last closed one."""

    def __init__(self, c: Coordinator):
        self.c = c
        self.current: SecAggRound | None = None  # secure aggregation of the open round
        self.parts: dict[tuple[str, int], tuple[int, bytearray]] = {}  # this round's chunked messages in flight
        self.last: SecAggRound | None = None  # ... of the last closed round (tells late pollers why)

    def of(self, rnd: R.Round) -> SecAggRound | None:
        """The secure aggregation of `rnd`, if it is the open one."""
        return self.current if self.current is not None and self.current.round_id == rnd.round_id else None

    def weight_cap(self, rnd: R.Round) -> int:
        """Examples a device can report at most: local steps x the largest (batch x grad_accum) of the selected."""
        c = self.c
        if c.cfg.secagg_weight_cap:
            return c.cfg.secagg_weight_cap
        cap = 1
        for d in rnd.selected:
            plan = c.store.device_plan(d)
            mode = c.method.device_mode(c.fed.devices[d].mode)
            steps = c.replanner.local_steps(d, mode)
            cap = max(cap, steps * int(plan.get("batch_size", 1)) * int(plan.get("grad_accum", 1)))
        return cap

    def open(self, rnd: R.Round) -> None:
        """Start the secure aggregation of a newly opened round."""
        c = self.c
        ranks = [c.fed.devices[d].assigned_rank for d in rnd.selected]
        zo = ZOScalars(c.cfg.seed + rnd.round_id, c.cfg.secagg_zo_pool, c.cfg.zo_lr or ZO_LR_REF) \
            if c.cfg.secagg_zo_pool > 0 else None
        p = c.policy
        payload = round_payload(c.global_state, c.method, ranks, self.weight_cap(rnd), zo, p.weight_temper,
                                p.loss_weight, p.num_labels)
        sa = SecAggRound.open(rnd.round_id, rnd.selected, payload, c.cfg.secagg_settings(), rnd.deadline)
        log.info("round %d: secure aggregation over %d devices, threshold %d, %d values per device",
                 rnd.round_id, len(rnd.selected), sa.server.params.threshold, payload.vector_len)
        self.current, self.parts = sa, {}

    def tick(self, rnd: R.Round, now: float) -> None:
        """Close due SecAgg phases; close the round once the sum is unmasked or the protocol aborted."""
        c = self.c
        sa = self.current
        if sa is None or sa.round_id != rnd.round_id:  # restarted: the keys and masked sum were only in memory
            reason = "the coordinator restarted during the round; its secure-aggregation state was in memory"
            c.store.event("secagg_abort", rnd.round_id, reason=reason)
            c.finish_close(replace(rnd, state=R.FAILED, closed_at=now), reason)
            return
        hb = c.cfg.heartbeat_timeout_s
        alive = {d for d in rnd.selected if d not in rnd.dropped and d in c.fed.devices
                 and now - c.fed.devices[d].last_seen <= hb}
        sa.advance(now, alive)
        if sa.done:
            self.current, self.last, self.parts = None, sa, {}
            self._close(rnd, sa, now)

    def _close(self, rnd: R.Round, sa: SecAggRound, now: float) -> None:
        """Close `rnd` after its protocol finished: publish the unmasked sum, or fail the round."""
        c = self.c
        metrics = sa.metrics()
        if sa.result is None:
            c.store.event("secagg_abort", rnd.round_id, reason=sa.abort_reason, **metrics)
            c.finish_close(replace(rnd, state=R.FAILED, closed_at=now),
                           f"secure aggregation aborted: {sa.abort_reason} The previous global is kept.")
            return
        rnd = R.close(rnd, c.fed.cfg, now)
        if rnd.state == R.AGGREGATED:
            try:
                t0 = time.perf_counter()
                ranks = [c.fed.devices[d].assigned_rank for d in rnd.selected]
                c.global_state = global_from_sum(sa.result.total, sa.payload, c.method, ranks, c.global_state)
                c.publisher.publish(rnd, metrics, len(sa.result.survivors), t0)
            except (ValueError, RuntimeError) as e:
                log.exception("round %d: aggregation of the secure sum failed", rnd.round_id)
                c.store.event("aggregation_failed", rnd.round_id, error=str(e))
                rnd = replace(rnd, state=R.FAILED)
        c.store.event("secagg_done", rnd.round_id, survivors=list(sa.result.survivors),
                      dropped=list(sa.result.dropped), **metrics)
        c.finish_close(rnd)

    def step(self, device_id: str, round_id: int, nonce: str, phase: int, payload: bytes,
             offset: int = 0, total_bytes: int = 0) -> dict[str, Any]:
        """One SecAggStep: record this device's message for `phase` (1-4) if any; return the phase's result or WAIT.

        A message larger than one gRPC message arrives in chunks (`offset`, `total_bytes`); it is
        processed once complete, and every earlier chunk is answered WAIT with `received_bytes`."""
        c = self.c
        received = 0
        with c._lock:
            rnd, sa = self._check_step(device_id, round_id, nonce, phase)
            if total_bytes and payload:
                payload, received = self._chunk(sa, device_id, phase, payload, offset, total_bytes)
                if not payload:  # more chunks to come
                    return {"phase": phase, "payload": b"", "wait": True, "retry_after_s": 0.0,
                            "received_bytes": received}
            if payload:
                sa.submit(device_id, phase - 1, payload, c.clock())
                if phase == 3 and device_id not in rnd.accepted:  # the masked input is in the sum
                    c.accept_upload(rnd, device_id, len(payload))
        c.tick()
        with c._lock:
            out = sa.reply(device_id, phase - 1)
        wait = min(0.25, c.cfg.poll_interval_s)
        return {"phase": phase, "payload": out or b"", "wait": out is None, "retry_after_s": wait if out is None else 0.0,
                "received_bytes": received}

    def _check_step(self, device_id: str, round_id: int, nonce: str, phase: int) -> tuple[R.Round, SecAggRound]:
        """The open round and its secure aggregation, or the error that refuses this SecAggStep."""
        rnd = self.c.fed.current
        last = self.last
        if last is not None and last.round_id == round_id and last.abort_reason:
            raise SecAggRejected(f"round {round_id}: secure aggregation aborted: {last.abort_reason}")
        if rnd is None or round_id != rnd.round_id or rnd.state != R.OPEN:
            raise R.LateUpload(f"round {round_id} is closed or not open (current round: "
                               f"{rnd.round_id if rnd else 'none'}); pick up the next round with GetTask")
        if device_id not in rnd.selected:
            raise R.NotSelected(f"device {device_id} is not selected for round {round_id}")
        if nonce != rnd.nonces.get(device_id):
            raise R.WrongRound(f"nonce {nonce!r} does not match the task issued for round {round_id}; "
                               "call GetTask again", reason="replay")
        sa = self.current
        if sa is None or sa.round_id != round_id:
            raise SecAggRejected(f"round {round_id} is not a secure-aggregation round; use UploadUpdate / SubmitZO")
        if not 1 <= phase <= 4:
            raise UploadRejected(f"unknown secure-aggregation phase {phase}; expected 1-4 (SecAggPhase)")
        return rnd, sa

    def _chunk(self, sa: SecAggRound, device_id: str, phase: int, data: bytes, offset: int,
               total: int) -> tuple[bytes, int]:
        """Add one chunk of a device's `phase` message: (the whole message once complete else b'',
        bytes held). A re-sent chunk is harmless; a gap is refused with the offset to resume from."""
        key = (device_id, phase)
        if device_id in sa.sent[phase - 1]:  # the whole message is already in: a retry of its last chunk
            return b"", total
        sa.check_open(device_id, phase - 1)
        cap = secagg_message_cap(sa.payload.vector_len)
        if total > cap:
            raise UploadTooLarge(f"secure-aggregation message of {total} B is larger than this round's {cap} B "
                                 f"(vector of {sa.payload.vector_len} values)")
        want, buf = self.parts.get(key, (total, bytearray()))
        if want != total:
            raise UploadRejected(f"chunk says the message has {total} B, earlier chunks said {want} B; "
                                 "resend the message from offset 0", reason="size_mismatch")
        end = offset + len(data)
        if offset > len(buf) or end > total:
            raise UploadRejected(f"chunk [{offset}, {end}) of a {total} B message does not continue the "
                                 f"{len(buf)} B the coordinator holds; resend from offset {len(buf)}",
                                 reason="size_mismatch")
        if end > len(buf):
            buf += data[len(buf) - offset:]
        if len(buf) < total:
            self.parts[key] = (total, buf)
            return b"", len(buf)
        self.parts.pop(key, None)
        return bytes(buf), total
