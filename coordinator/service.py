"""The coordinator: rounds (coordinator.rounds) + durable store + strategy, behind one lock.

Transport-free: the gRPC servicer (coordinator.server) calls these methods and maps the
domain errors (coordinator.rounds.RoundError subclasses, UploadRejected) to status codes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from protos import wire

from . import rounds as R
from .aggregation import GlobalState
from .defences import DefenceConfig, RoundUpload, defended_round, dp_epsilon
from .engine import RoundEngine, global_to_bytes
from .enrolment import EnrolmentRegistry
from .methods import DEFAULT, MethodConfig, make_method, method_class
from .recovery import load_global
from .secagg_round import (SecAggRejected, SecAggRound, SecAggSettings, check_message_size, check_secagg_config,
                           ZO_LR_REF, ZOScalars, global_from_sum, round_payload, secagg_message_cap)
from .validation import RejectionLog, UpdateInvalid
from .config import CoordinatorConfig  # noqa: F401  (re-exported: coordinator.service.CoordinatorConfig)
from .metrics import CoordinatorMetrics
from .store import Store, round_dir

log = logging.getLogger("coordinator")


class UploadRejected(ValueError):
    """An upload is malformed: wrong shapes, non-finite values, bad checksum, norm too large."""

    code = "INVALID_ARGUMENT"
    reason: str | None = None  # coordinator.validation.REASONS label, when known


class UploadTooLarge(UploadRejected):
    code = "RESOURCE_EXHAUSTED"


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Coordinator:
    """Owns the federation state; every public method is thread-safe."""

    def __init__(self, cfg: CoordinatorConfig, clock=time.time):
        self.cfg = cfg
        self.clock = clock
        self.method = make_method(cfg.method_config())
        self.fed = R.Federation(cfg.round_config())
        self.store = Store(cfg.store)
        self.defence = cfg.defence_config()
        self.enrolment = EnrolmentRegistry(cfg.store)
        self.rejections = RejectionLog(cfg.store)
        self._lock = threading.RLock()
        self._upload_locks: dict[str, threading.Lock] = {}  # device id -> its partial-upload files' lock
        self.metrics = CoordinatorMetrics(self)  # Prometheus registry of this instance
        self._tokens: dict[str, str] = {}  # token sha256 -> device id
        self._evaluator = None
        self._model = None
        self._steps: dict[str, int] = {}  # device -> local steps when re-planned (--replan)
        self._fold: RoundEngine | None = None  # streaming aggregate of the open round
        self._secagg: SecAggRound | None = None  # secure aggregation of the open round (--secagg)
        self._secagg_parts: dict[tuple[str, int], tuple[int, bytearray]] = {}  # this round's chunked messages in flight
        self._secagg_last: SecAggRound | None = None  # ... of the last closed round (tells late pollers why)
        self._resume_or_init()
        if cfg.secagg:
            check_message_size(round_payload(self.global_state, self.method, [cfg.max_rank], 1))

    # -- start-up ---------------------------------------------------------------------------
    def _load_model(self):
        if self._model is None:
            from .model import load_base_model
            self._model = load_base_model(self.cfg.model, self.cfg.task, self.cfg.num_labels, self.cfg.seed)
        return self._model

    def _resume_or_init(self) -> None:
        saved = self.store.get_meta("config")
        if saved is not None:
            for key in ("strategy", "max_rank", "task", "lora_alpha", "use_rslora"):
                if saved.get(key) != asdict(self.cfg).get(key):
                    raise ValueError(f"store {self.cfg.store} was created with {key}={saved.get(key)!r}, not "
                                     f"{asdict(self.cfg).get(key)!r}; use a new --store or the same settings")
            self.target_modules = saved["target_modules"]
            recovered = load_global(self.store)  # newest global that passes its checksum
            self.global_state, self.global_round = recovered.state, recovered.round_id
            self._restore_rounds()
            log.info("resumed store %s at round %d (%d aggregated)", self.cfg.store, self.fed.last_round_id,
                     self.fed.completed)
            self.store.event("resume", self.fed.last_round_id)
        else:
            from .model import initial_adapter_state, resolve_target_modules
            model, _ = self._load_model()
            self.target_modules = resolve_target_modules(model, self.cfg.target_modules or None)
            init = initial_adapter_state(model, self.target_modules, self.cfg.max_rank, self.cfg.lora_alpha,
                                         self.cfg.use_rslora, self.cfg.seed)
            self.global_state = self.method.initial(init)
            self.global_round = 0
            self._write_global(0, {})
            meta = asdict(self.cfg)
            meta["target_modules"] = self.target_modules
            self.store.set_meta("config", meta)
            self.store.event("init", 0, strategy=self.cfg.strategy, target_modules=self.target_modules)
        if self.cfg.eval_data and self.global_round == 0 and not self.store.get_meta("initial_metrics"):
            self.store.set_meta("initial_metrics", self.evaluate(self.global_state))

    def _restore_rounds(self) -> None:
        for dev, token_sha in self.store.devices().values():
            self.fed.devices[dev.device_id] = dev
            self._tokens[token_sha] = dev.device_id
        rows = self.store.rounds()
        self.fed.completed = sum(r["state"] == R.AGGREGATED for r in rows)
        self.fed.last_round_id = rows[-1]["round_id"] if rows else 0
        if rows:
            last = rows[-1]
            accepted = [u["device_id"] for u in self.store.updates(last["round_id"])]
            rnd = self.store.load_round(last, accepted)
            if rnd.state == R.OPEN:  # resume the open round with its accepted updates; fresh deadline
                now = self.clock()
                rnd = replace(rnd, deadline=now + self.cfg.round_timeout_s)
                for d in rnd.selected:  # devices get a grace period to come back
                    if d in self.fed.devices:
                        self.fed.devices[d] = replace(self.fed.devices[d], last_seen=now)
                self.store.put_round(rnd)
            self.fed.current = rnd

    # -- helpers ----------------------------------------------------------------------------
    def _write_global(self, round_id: int, metrics: dict[str, Any]) -> None:
        from .model import peft_export_files

        d = round_dir(self.store.root, round_id)
        rel = self.store.rel(d / "global.safetensors")
        sha = self.store.write_blob(rel, global_to_bytes(self.global_state))
        cfg_json, tensors = peft_export_files(self.method.deltas(self.global_state), self.global_state.extra,
                                              self.target_modules, self.cfg.model, self.cfg.task)
        self.store.write_blob(self.store.rel(d / "peft" / "adapter_model.safetensors"),
                              wire.encode_tensors(tensors, {"format": "pt"}, packed=False))
        self.store.write_blob(self.store.rel(d / "peft" / "adapter_config.json"), cfg_json.encode())
        if round_id > 0:
            self.store.set_round_global(round_id, rel, sha, metrics)
        else:
            self.store.set_meta("initial_global_sha256", sha)
        self.store.set_meta("global", {"round_id": round_id, "path": rel, "sha256": sha})

    def evaluate(self, g: GlobalState) -> dict[str, float]:
        """Held-out metrics of base + g on --eval-data ({} when no eval data is configured)."""
        if not self.cfg.eval_data:
            return {}
        if self._evaluator is None:
            from .model import Evaluator, load_eval_records
            model, tok = self._load_model()
            self._evaluator = Evaluator(model, tok, load_eval_records(self.cfg.eval_data, self.cfg.eval_limit),
                                        task=self.cfg.task)
        return self._evaluator.evaluate(self.method.deltas(g), g.extra)

    def authenticate(self, token: str) -> str:
        with self._lock:
            dev = self._tokens.get(_hash_token(token or ""))
            if dev is None:
                raise R.UnknownDevice("unknown or missing device token; send 'authorization: Bearer <token>' "
                                      "from Register (re-register if the coordinator's store was reset)")
            self.enrolment.check_device(dev)  # revoked -> PERMISSION_DENIED
            now = self.clock()
            self.fed.devices[dev] = replace(self.fed.devices[dev], last_seen=now)
            return dev

    def record_rejection(self, reason: str, detail: str, rpc: str = "", device_id: str | None = None) -> None:
        """Count a refused request durably, per reason (shown by `edge-coordinator status`)."""
        self.rejections.record(reason, detail, rpc, device_id)

    def _download_id(self, rnd: R.Round, device_id: str) -> str:
        dev = self.fed.devices[device_id]
        mode = self.method.device_mode(dev.mode)
        if self.method.coordinator_keeps(mode):  # a per-device download: it carries what we kept for it
            return f"r{rnd.round_id:04d}-{device_id}"
        return f"r{rnd.round_id:04d}-{mode}-rank{dev.assigned_rank}"

    def _engine(self, round_id: int) -> RoundEngine:
        """An empty engine for `round_id` from the current global (downloads, validation)."""
        return RoundEngine(self.method, self.global_state, round_id, self.cfg.norm_bound)

    def _kept(self, device_id: str, mode: str) -> dict[str, torch.Tensor]:
        """What the method keeps on the coordinator for this device: from its last accepted upload."""
        if not self.method.coordinator_keeps(mode):
            return {}
        for u in reversed(self.store.updates()):
            if u["device_id"] == device_id:
                return self._engine(0).kept_from(self._stored_state(u), mode)
        return {}

    def _ensure_downloads(self, rnd: R.Round) -> None:
        for d in rnd.selected:
            did = self._download_id(rnd, d)
            if self.store.download(did):
                continue
            dev = self.fed.devices[d]
            mode = self.method.device_mode(dev.mode)
            engine = self._engine(rnd.round_id)
            tensors = engine.download(dev.assigned_rank, mode, self.cfg.seed + rnd.round_id, self._kept(d, mode))
            self.store.put_download(did, rnd.round_id, engine.blob(tensors, dev.assigned_rank, mode))

    def _download_tensors(self, download_id: str) -> dict[str, torch.Tensor]:
        row = self.store.download(download_id)
        if row is None:
            raise R.WrongRound(f"download {download_id!r} does not exist")
        return wire.decode_tensors(self.store.read_blob(row["path"], row["sha256"]))[0]

    def _stored_state(self, u: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A stored upload's adapter state (ZO: replayed from what the device downloaded)."""
        if u["kind"] != "ZO":
            return wire.decode_tensors(self.store.read_blob(u["path"], u["sha256"]))[0]
        z = json.loads(self.store.read_blob(u["path"], u["sha256"]))
        return RoundEngine.replay_zo(self._download_tensors(u["download_id"]), list(zip(z["seeds"], z["grads"])),
                                     z["lr"])

    # -- rounds -----------------------------------------------------------------------------
    def tick(self) -> None:
        """Advance time: dropouts, deadlines, aggregation, opening the next round."""
        with self._lock:
            now = self.clock()
            rnd = self.fed.current
            if rnd is not None and rnd.state == R.OPEN:
                rnd2 = R.mark_dropouts(rnd, self.fed.devices, self.fed.cfg, now)
                if rnd2 is not rnd:
                    for d in set(rnd2.dropped) - set(rnd.dropped):
                        self.store.event("dropout", rnd.round_id, d)
                        log.info("round %d: device %s dropped out (no heartbeat)", rnd.round_id, d)
                    self.store.put_round(rnd2)
                    self.fed.current = rnd = rnd2
                if self.cfg.secagg:
                    self._secagg_tick(rnd, now)
                elif R.should_close(rnd, now):
                    self._close(rnd, now)
            if self.fed.done:
                return
            rnd = self.fed.current
            if rnd is None or rnd.state != R.OPEN:
                self._open(self.clock())  # aggregation/evaluation may have taken a while

    def _open(self, now: float) -> None:
        rid = self.fed.last_round_id + 1
        nonces = {d: secrets.token_hex(16) for d in self.fed.devices}
        rnd = R.open_round(self.fed.devices, self.fed.cfg, rid, now, nonces)
        if rnd is None:
            return
        self.fed.current, self.fed.last_round_id = rnd, rid
        for d in rnd.selected:  # the coordinator was busy (aggregating, evaluating), not the devices:
            self.fed.devices[d] = replace(self.fed.devices[d], last_seen=now)  # grace from round open
        self._ensure_downloads(rnd)
        if self.cfg.secagg:
            self._secagg, self._secagg_parts = self._open_secagg(rnd), {}
        self.store.put_round(rnd)
        self.store.event("round_open", rid, selected=list(rnd.selected))
        log.info("round %d open: %d devices selected, deadline in %.0fs", rid, len(rnd.selected),
                 rnd.deadline - now)

    def _close(self, rnd: R.Round, now: float) -> None:
        rnd = R.close(rnd, self.fed.cfg, now)
        if rnd.state == R.AGGREGATED:
            try:
                self._aggregate(rnd)
            except (ValueError, RuntimeError) as e:  # keep serving; the round fails visibly
                log.exception("round %d: aggregation failed", rnd.round_id)
                self.store.event("aggregation_failed", rnd.round_id, error=str(e))
                rnd = replace(rnd, state=R.FAILED)
        self._finish_close(rnd)

    def _finish_close(self, rnd: R.Round, reason: str = "") -> None:
        """Record a closed round (aggregated or failed, `reason` logged) and count it."""
        self.fed.current = rnd
        self.store.put_round(rnd)
        if rnd.state == R.AGGREGATED:
            self.fed.completed += 1
        elif reason:
            log.warning("round %d failed: %s", rnd.round_id, reason)
        else:
            log.warning("round %d failed: %d/%d uploads (quorum %d)", rnd.round_id, len(rnd.accepted),
                        len(rnd.selected), R.quorum_size(rnd, self.fed.cfg))
        self.store.event("round_close", rnd.round_id, state=rnd.state, accepted=list(rnd.accepted),
                         dropped=list(rnd.dropped))
        if self.cfg.replan:
            self._replan(rnd)

    def _stored_uploads(self, round_id: int):
        """Yield this round's accepted uploads from disk, decoded one at a time (ZO: replayed)."""
        for u in self.store.updates(round_id):
            yield RoundUpload(u["device_id"], self._stored_state(u), float(max(u["num_examples"], 1)))

    def _round_fold(self, rnd: R.Round) -> RoundEngine:
        """The streaming aggregate of `rnd`; rebuilt from the durable uploads when missing or stale."""
        accepted = {u["device_id"] for u in self.store.updates(rnd.round_id)}
        fold = self._fold
        if fold is None or fold.round_id != rnd.round_id or fold.devices != accepted:
            fold = self._engine(rnd.round_id)
            for up in self._stored_uploads(rnd.round_id):
                fold.fold(up.device_id, up.state, up.weight)
            self._fold = fold
        return fold

    def _fold_accepted(self, rnd: R.Round, device_id: str, state: dict[str, torch.Tensor], weight: int) -> None:
        """Fold an accepted upload (already durable on disk) into the round's streaming aggregate."""
        if self.defence.active:  # robust statistics need every update at once: batch at close
            return
        try:
            fold = self._fold
            if fold is None or fold.round_id != rnd.round_id:
                fold = self._round_fold(rnd)  # first upload of the round, or after a restart
            if device_id not in fold.devices:
                fold.fold(device_id, state, float(max(weight, 1)))
        except (ValueError, RuntimeError) as e:  # the close re-reads the round from disk
            log.warning("round %d: streaming fold of %s failed (%s); will rebuild from disk", rnd.round_id,
                        device_id, e)
            self._fold = None

    def _aggregate(self, rnd: R.Round) -> None:
        t0 = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.defence.active:  # clipping / robust statistics / DP over updates (coordinator.defences)
            uploads = list(self._stored_uploads(rnd.round_id))
            dls = [self._download_tensors(u["download_id"]) for u in self.store.updates(rnd.round_id)]
            self.global_state, metrics = defended_round(self.global_state, uploads, dls, self.method, self.defence,
                                                        seed=self.cfg.seed * 7919 + rnd.round_id)
            if self.defence.dp_noise > 0:
                history = self.store.get_meta("dp_history", []) + [[self.defence.dp_noise, self.defence.dp_sample_rate]]
                self.store.set_meta("dp_history", history)
                metrics.update(dp_epsilon=dp_epsilon(history, self.defence.dp_delta), dp_delta=self.defence.dp_delta)
                log.info("round %d: DP epsilon %.3f at delta %g", rnd.round_id, metrics["dp_epsilon"],
                         self.defence.dp_delta)
        else:  # streaming: memory O(global state), not O(devices x adapter)
            fold = self._round_fold(rnd)
            self.global_state, metrics = fold.close()
            uploads = fold.devices
            self._fold = None
        self._publish(rnd, metrics, len(uploads), t0)

    def _publish(self, rnd: R.Round, metrics: dict[str, Any], n_uploads: int, t0: float) -> None:
        """Evaluate and durably write the new global state of `rnd`."""
        self.global_round = rnd.round_id
        metrics.update({"aggregate_s": time.perf_counter() - t0, "uploads": n_uploads})
        metrics.update(self.evaluate(self.global_state))
        self._write_global(rnd.round_id, metrics)
        log.info("round %d aggregated (%s, %d uploads)%s", rnd.round_id, self.cfg.strategy, n_uploads,
                 f": eval loss {metrics['loss']:.4f}" if "loss" in metrics else "")

    # -- secure aggregation (--secagg) ------------------------------------------------------
    def _secagg_weight_cap(self, rnd: R.Round) -> int:
        """Examples a device can report at most: local steps x the largest (batch x grad_accum) of the selected."""
        if self.cfg.secagg_weight_cap:
            return self.cfg.secagg_weight_cap
        cap = 1
        for d in rnd.selected:
            plan = self.store.device_plan(d)
            mode = self.method.device_mode(self.fed.devices[d].mode)
            cap = max(cap, self._local_steps(d, mode) * int(plan.get("batch_size", 1)) * int(plan.get("grad_accum", 1)))
        return cap

    def _open_secagg(self, rnd: R.Round) -> SecAggRound:
        ranks = [self.fed.devices[d].assigned_rank for d in rnd.selected]
        zo = ZOScalars(self.cfg.seed + rnd.round_id, self.cfg.secagg_zo_pool, self.cfg.zo_lr or ZO_LR_REF) \
            if self.cfg.secagg_zo_pool > 0 else None
        payload = round_payload(self.global_state, self.method, ranks, self._secagg_weight_cap(rnd), zo)
        sa = SecAggRound.open(rnd.round_id, rnd.selected, payload, self.cfg.secagg_settings(), rnd.deadline)
        log.info("round %d: secure aggregation over %d devices, threshold %d, %d values per device",
                 rnd.round_id, len(rnd.selected), sa.server.params.threshold, payload.vector_len)
        return sa

    def _secagg_tick(self, rnd: R.Round, now: float) -> None:
        """Close due SecAgg phases; close the round once the sum is unmasked or the protocol aborted."""
        sa = self._secagg
        if sa is None or sa.round_id != rnd.round_id:  # restarted: the keys and masked sum were only in memory
            reason = "the coordinator restarted during the round; its secure-aggregation state was in memory"
            self.store.event("secagg_abort", rnd.round_id, reason=reason)
            self._finish_close(replace(rnd, state=R.FAILED, closed_at=now), reason)
            return
        hb = self.cfg.heartbeat_timeout_s
        alive = {d for d in rnd.selected if d not in rnd.dropped and d in self.fed.devices
                 and now - self.fed.devices[d].last_seen <= hb}
        sa.advance(now, alive)
        if not sa.done:
            return
        self._secagg, self._secagg_last, self._secagg_parts = None, sa, {}
        metrics = sa.metrics()
        if sa.result is None:
            self.store.event("secagg_abort", rnd.round_id, reason=sa.abort_reason, **metrics)
            self._finish_close(replace(rnd, state=R.FAILED, closed_at=now),
                               f"secure aggregation aborted: {sa.abort_reason} The previous global is kept.")
            return
        rnd = R.close(rnd, self.fed.cfg, now)
        if rnd.state == R.AGGREGATED:
            try:
                t0 = time.perf_counter()
                ranks = [self.fed.devices[d].assigned_rank for d in rnd.selected]
                self.global_state = global_from_sum(sa.result.total, sa.payload, self.method, ranks, self.global_state)
                self._publish(rnd, metrics, len(sa.result.survivors), t0)
            except (ValueError, RuntimeError) as e:
                log.exception("round %d: aggregation of the secure sum failed", rnd.round_id)
                self.store.event("aggregation_failed", rnd.round_id, error=str(e))
                rnd = replace(rnd, state=R.FAILED)
        self.store.event("secagg_done", rnd.round_id, survivors=list(sa.result.survivors),
                         dropped=list(sa.result.dropped), **metrics)
        self._finish_close(rnd)

    def secagg_step(self, device_id: str, round_id: int, nonce: str, phase: int, payload: bytes,
                    offset: int = 0, total_bytes: int = 0) -> dict[str, Any]:
        """One SecAggStep: record this device's message for `phase` (1-4) if any; return the phase's result or WAIT.

        A message larger than one gRPC message arrives in chunks (`offset`, `total_bytes`); it is
        processed once complete, and every earlier chunk is answered WAIT with `received_bytes`."""
        received = 0
        with self._lock:
            rnd = self.fed.current
            last = self._secagg_last
            if last is not None and last.round_id == round_id and last.abort_reason:
                raise SecAggRejected(f"round {round_id}: secure aggregation aborted: {last.abort_reason}")
            if rnd is None or round_id != rnd.round_id or rnd.state != R.OPEN:
                raise R.LateUpload(f"round {round_id} is closed or not open (current round: "
                                   f"{rnd.round_id if rnd else 'none'}); pick up the next round with GetTask")
            if device_id not in rnd.selected:
                raise R.NotSelected(f"device {device_id} is not selected for round {round_id}")
            if nonce != rnd.nonces.get(device_id):
                raise R.WrongRound(f"nonce {nonce!r} does not match the task issued for round {round_id}; "
                                   "call GetTask again")
            sa = self._secagg
            if sa is None or sa.round_id != round_id:
                raise SecAggRejected(f"round {round_id} is not a secure-aggregation round; use UploadUpdate / SubmitZO")
            if not 1 <= phase <= 4:
                raise UploadRejected(f"unknown secure-aggregation phase {phase}; expected 1-4 (SecAggPhase)")
            if total_bytes and payload:
                payload, received = self._secagg_chunk(sa, device_id, phase, payload, offset, total_bytes)
                if not payload:  # more chunks to come
                    return {"phase": phase, "payload": b"", "wait": True, "retry_after_s": 0.0,
                            "received_bytes": received}
            if payload:
                sa.submit(device_id, phase - 1, payload, self.clock())
                if phase == 3 and device_id not in rnd.accepted:  # the masked input is in the sum
                    self._accepted(rnd, device_id, len(payload))
        self.tick()
        with self._lock:
            out = sa.reply(device_id, phase - 1)
        wait = min(0.25, self.cfg.poll_interval_s)
        return {"phase": phase, "payload": out or b"", "wait": out is None, "retry_after_s": wait if out is None else 0.0,
                "received_bytes": received}

    def _secagg_chunk(self, sa: SecAggRound, device_id: str, phase: int, data: bytes, offset: int,
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
        want, buf = self._secagg_parts.get(key, (total, bytearray()))
        if want != total:
            raise UploadRejected(f"chunk says the message has {total} B, earlier chunks said {want} B; "
                                 "resend the message from offset 0")
        end = offset + len(data)
        if offset > len(buf) or end > total:
            raise UploadRejected(f"chunk [{offset}, {end}) of a {total} B message does not continue the "
                                 f"{len(buf)} B the coordinator holds; resend from offset {len(buf)}")
        if end > len(buf):
            buf += data[len(buf) - offset:]
        if len(buf) < total:
            self._secagg_parts[key] = (total, buf)
            return b"", len(buf)
        self._secagg_parts.pop(key, None)
        return bytes(buf), total

    # -- RPC-level operations ---------------------------------------------------------------
    def register(self, profile_json: str, plan_json: str, enrolment_token: str, device_name: str) -> dict[str, Any]:
        bound: tuple[str, str | None] | None = None  # (enrolment token id, device it enrolled)
        shared = bool(self.cfg.enrolment_token) and secrets.compare_digest(enrolment_token.encode(),
                                                                           self.cfg.enrolment_token.encode())
        if enrolment_token and not shared:
            bound = self.enrolment.verify(enrolment_token)  # unknown -> UNAUTHENTICATED, revoked -> PERMISSION_DENIED
        elif not shared and not self.cfg.open_enrolment:
            raise R.UnknownDevice("this coordinator requires an enrolment token; ask the operator "
                                  "(`edge-coordinator enrol --store DIR`) and pass --enrolment-token")
        try:
            plan = json.loads(plan_json)
            rank, mode = int(plan["rank"]), str(plan.get("mode", "lora"))
        except (ValueError, KeyError, TypeError) as e:
            raise UploadRejected(f"plan_json is not a plan with 'rank' and 'mode': {e}") from None
        if mode not in ("lora", "zo"):
            raise UploadRejected(f"plan mode {mode!r} is invalid: expected 'lora' or 'zo'")
        name = device_name or f"device-{secrets.token_hex(4)}"
        if bound and bound[1]:  # a token re-enrols the device it first enrolled, under its name
            known = self.fed.devices.get(bound[1])
            name = known.name if known else name
        with self._lock:
            dev = R.enrol(self.fed.devices, "d-" + secrets.token_hex(6), name, rank, mode, self.fed.cfg, self.clock())
            token = secrets.token_urlsafe(32)
            owner = self.enrolment.token_of(dev.device_id)
            if (bound and bound[1] and bound[1] != dev.device_id) or (owner and (not bound or owner != bound[0])):
                raise R.UnknownDevice(f"device name {name!r} is enrolled with another enrolment token; use your own "
                                      "token and a name of your own")
            self.enrolment.check_device(dev.device_id)
            if bound:
                self.enrolment.bind(bound[0], dev.device_id)
            self._tokens = {k: v for k, v in self._tokens.items() if v != dev.device_id}
            self._tokens[_hash_token(token)] = dev.device_id
            self.fed.devices[dev.device_id] = dev
            self.store.put_device(dev, _hash_token(token), profile_json, plan_json)
            self.store.event("register", None, dev.device_id, name=name, plan_rank=rank, assigned=dev.assigned_rank)
            log.info("device %s (%s) registered: plan rank %d -> assigned rank %d, mode %s", dev.device_id, name,
                     rank, dev.assigned_rank, self.method.device_mode(mode))
        self.tick()
        return {"device_id": dev.device_id, "device_token": token, "assigned_rank": dev.assigned_rank,
                "mode": self.method.device_mode(mode)}

    def get_task(self, device_id: str) -> dict[str, Any]:
        self.tick()
        with self._lock:
            dev = self.fed.devices[device_id]
            base = {"assigned_rank": dev.assigned_rank, "retry_after_s": self.cfg.poll_interval_s}
            if self.fed.done:
                return {**base, "state": "DONE", "round_id": self.fed.last_round_id, "message": "federation finished"}
            rnd = self.fed.current
            if rnd is None or rnd.state != R.OPEN:
                return {**base, "state": "WAIT", "round_id": self.fed.last_round_id,
                        "message": "waiting for enough devices to open a round"}
            if device_id not in rnd.selected or device_id in rnd.accepted:
                why = "update accepted; waiting for the round to close" if device_id in rnd.accepted else \
                    "not selected for this round"
                return {**base, "state": "WAIT", "round_id": rnd.round_id, "message": why}
            sa = self._secagg if self._secagg is not None and self._secagg.round_id == rnd.round_id else None
            if sa is not None and sa.phase > 0 and device_id not in sa.members:
                return {**base, "state": "WAIT", "round_id": rnd.round_id,
                        "message": "left out of this round's secure aggregation (too late); wait for the next round"}
            secagg = {"secagg": True, "secagg_params": sa.server.params.to_bytes(),
                      "secagg_payload": sa.payload.to_bytes()} if sa is not None else {}
            did = self._download_id(rnd, device_id)
            row = self.store.download(did)
            mode = self.method.device_mode(dev.mode)
            return {**base, **secagg, "state": "TRAIN", "round_id": rnd.round_id,
                    "local_steps": self._local_steps(device_id, mode),
                    "lr": self.cfg.zo_lr if mode == "zo" else self.cfg.lr, "seed": self.cfg.seed + rnd.round_id,
                    "deadline_unix": rnd.deadline, "download_id": did, "download_size": row["size"],
                    "download_sha256": row["sha256"], "nonce": rnd.nonces[device_id], "mode": mode}

    def download(self, device_id: str, round_id: int, download_id: str) -> bytes:
        with self._lock:
            row = self.store.download(download_id)
            if row is None or row["round_id"] != round_id:
                raise R.WrongRound(f"download {download_id!r} is not part of round {round_id}; call GetTask again")
            if "-d-" in download_id and not download_id.endswith(device_id):
                raise R.NotSelected(f"download {download_id!r} belongs to another device")
            return self.store.read_blob(row["path"], row["sha256"])

    def heartbeat(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            return {"current_round": self.fed.last_round_id, "server_time_unix": self.clock()}

    def upload_status(self, device_id: str, upload_id: str) -> int:
        return self.store.partial_size(self._upload_key(device_id, upload_id))

    @staticmethod
    def _upload_key(device_id: str, upload_id: str) -> str:
        return f"{device_id}_{upload_id}"

    def upload_append(self, device_id: str, upload_id: str, offset: int, data: bytes, total_size: int) -> int:
        if total_size > self.cfg.max_upload_bytes:
            raise UploadTooLarge(f"upload of {total_size} bytes exceeds the {self.cfg.max_upload_bytes}-byte cap; "
                                 "lower the rank or use a lower upload precision")
        if offset + len(data) > total_size:
            raise UploadRejected(f"chunk at offset {offset} (+{len(data)} bytes) runs past the declared total "
                                 f"size {total_size}")
        with self._device_upload_lock(device_id):
            if offset == 0:  # a device has one upload in flight: forget its abandoned partials (bounded disk)
                keep = self._upload_key(device_id, upload_id) + ".part"
                for p in (self.store.root / "partial").glob(f"{device_id}_*.part"):
                    if p.name != keep:
                        p.unlink(missing_ok=True)
            try:
                return self.store.append_partial(self._upload_key(device_id, upload_id), offset, data)
            except ValueError as e:
                raise UploadRejected(str(e)) from None

    def _device_upload_lock(self, device_id: str) -> threading.Lock:
        with self._lock:
            return self._upload_locks.setdefault(device_id, threading.Lock())

    def _precheck(self, device_id: str, round_id: int, nonce: str) -> R.Round:
        if self.cfg.secagg:  # an unmasked individual update must never reach this coordinator
            raise SecAggRejected("this coordinator runs secure aggregation (--secagg): send the update through "
                                 "SecAggStep as the task says, not UploadUpdate / SubmitZO")
        rnd = self.fed.current
        try:
            R.check_upload(rnd, round_id, device_id, nonce)
        except R.LateUpload:
            if rnd is not None and round_id <= rnd.round_id:
                if rnd.round_id == round_id:
                    self.fed.current = R.count_late(rnd)
                    self.store.put_round(self.fed.current)
                self.store.event("late_upload", round_id, device_id)
                log.info("round %d: late upload from %s rejected", round_id, device_id)
            raise
        return rnd

    def upload_precheck(self, device_id: str, round_id: int, nonce: str, stats: dict[str, Any] | None = None) -> None:
        """Refuse an upload stream at its header (wrong/closed round, stale nonce) before bytes flow.

        A late upload's header still carries the device's measurements (`stats`): with --replan
        they re-plan that straggler at once, the device that most needs it."""
        with self._lock:
            try:
                self._precheck(device_id, round_id, nonce)
            except R.LateUpload:
                if stats and self.cfg.replan:
                    self._replan_late(device_id, round_id, stats)
                raise

    def finish_upload(self, device_id: str, header: dict[str, Any], wire_bytes: int) -> int:
        """Validate the assembled upload and accept it; returns its size. Raises domain errors."""
        key = self._upload_key(device_id, header["upload_id"])
        with self._lock:
            try:
                rnd = self._precheck(device_id, header["round_id"], header["nonce"])
            except R.RoundError:
                self.store.drop_partial(key)
                raise
            with self._device_upload_lock(device_id):
                data = self.store.take_partial(key)
            if len(data) < header["total_size"]:  # an interrupted stream: keep the bytes so the device can resume
                e = UploadRejected(f"received {len(data)} bytes but the header declared {header['total_size']}; "
                                   f"resume from UploadStatus (offset {len(data)})")
                self.store.event("upload_incomplete", rnd.round_id, device_id, reason="size_mismatch",
                                 detail=str(e)[:300])
                raise e
            try:
                if len(data) != header["total_size"]:
                    raise UploadRejected(f"received {len(data)} bytes but the header declared {header['total_size']}; "
                                         "upload again from offset 0")
                if wire.sha256_hex(data) != header["sha256"]:
                    raise UploadRejected("upload sha256 does not match the header's checksum (corrupted transfer); "
                                         "upload again")
                try:
                    state, meta = wire.decode_tensors(data)
                except (wire.WireError, ValueError, RuntimeError, KeyError) as e:
                    raise UploadRejected(f"upload is not a valid tensor blob: {e}") from None
                did = self._download_id(rnd, device_id)
                mode = self.method.device_mode(self.fed.devices[device_id].mode)
                try:
                    self._engine(rnd.round_id).validate(state, self._download_tensors(did), mode,
                                                        meta.get("precision"))
                except UpdateInvalid as e:
                    rej = UploadRejected(str(e))
                    rej.reason = e.reason
                    raise rej from None
            except UploadRejected as e:
                self.store.drop_partial(key)
                self.store.event("upload_rejected", rnd.round_id, device_id, reason=e.reason, detail=str(e)[:300])
                raise
            stats = header.get("stats", {})
            self.store.put_update(rnd.round_id, device_id, header["nonce"], "LORA", data, ".safetensors", wire_bytes,
                                  int(stats.get("num_examples", 1)), did, stats)
            self.store.drop_partial(key)
            self._note_plan(device_id, stats)
            self._accepted(rnd, device_id, len(data))
            self._fold_accepted(rnd, device_id, state, int(stats.get("num_examples", 1)))
        self.tick()
        return len(data)

    def submit_zo(self, device_id: str, round_id: int, nonce: str, seeds: list[int], grads: list[float], lr: float,
                  num_examples: int, stats: dict[str, Any], wire_bytes: int) -> int:
        with self._lock:
            rnd = self._precheck(device_id, round_id, nonce)
            if len(seeds) != len(grads) or not seeds:
                raise UploadRejected(f"ZO update needs as many seeds as grads (>= 1); got {len(seeds)} and {len(grads)}")
            if not all(map(lambda g: g == g and abs(g) != float("inf"), grads)) or not (lr == lr and 0 < abs(lr) < 1e6):
                raise UploadRejected("ZO update has a non-finite projected gradient or learning rate")
            did = self._download_id(rnd, device_id)
            sent = self._download_tensors(did)
            final = RoundEngine.replay_zo(sent, list(zip(seeds, grads)), lr)
            mode = self.method.device_mode(self.fed.devices[device_id].mode)
            try:
                self._engine(round_id).validate(final, sent, "zo")
            except ValueError as e:
                raise UploadRejected(f"replayed ZO update is invalid: {e}") from None
            data = json.dumps({"seeds": list(seeds), "grads": list(grads), "lr": lr, "mode": mode}).encode()
            self.store.put_update(round_id, device_id, nonce, "ZO", data, ".zo.json", wire_bytes, int(num_examples),
                                  did, stats)
            self._note_plan(device_id, stats)
            self._accepted(rnd, device_id, len(data))
            self._fold_accepted(rnd, device_id, final, int(num_examples))
        self.tick()
        return len(data)

    def _local_steps(self, device_id: str, mode: str) -> int:
        """This device's local steps: the re-planned value (scaled for ZO devices) or the configured one."""
        base = (self.cfg.zo_local_steps or self.cfg.local_steps) if mode == "zo" else self.cfg.local_steps
        k = self._steps.get(device_id)
        return base if k is None else max(1, round(base * k / self.cfg.local_steps))

    def _note_plan(self, device_id: str, stats: dict[str, Any]) -> None:
        """A device that stepped down after an out-of-memory reports its new plan: never assign above it."""
        from .replan import rank_after_report, reported_plan

        plan = reported_plan(stats or {})
        dev = self.fed.devices.get(device_id)
        if plan is None or dev is None or plan["rank"] >= dev.plan_rank:
            return
        if self.method.common_rank:
            log.warning("device %s stepped down to rank %d but strategy %s trains one common rank %d", device_id,
                        plan["rank"], self.cfg.strategy, dev.assigned_rank)
            return
        plan_rank, assigned = rank_after_report(dev.plan_rank, dev.assigned_rank, plan["rank"])
        self.fed.devices[device_id] = replace(dev, plan_rank=plan_rank, assigned_rank=assigned)
        self.store.event("plan_stepped_down", None, device_id, plan_rank=plan_rank, assigned=assigned)
        log.info("device %s stepped down: plan rank %d -> %d, assigned rank %d", device_id, dev.plan_rank, plan_rank,
                 assigned)

    def _replan(self, rnd: R.Round) -> None:
        """Re-fit the selected devices' rank and local steps to the deadline (coordinator.replan)."""
        from .replan import RoundReport, replan

        stats = {u["device_id"]: u["stats"] for u in self.store.updates(rnd.round_id)}
        devs = {d: self.fed.devices[d] for d in rnd.selected if d in self.fed.devices}
        current = {d: (dev.assigned_rank, self._steps.get(d, self.cfg.local_steps)) for d, dev in devs.items()}
        reports = {d: RoundReport.from_stats(stats[d], devs[d].assigned_rank) if d in stats else None for d in devs}
        new = replan(reports, self.cfg.round_timeout_s, current, plan_ranks={d: v.plan_rank for d, v in devs.items()},
                     target_steps=self.cfg.local_steps, max_rank=self.cfg.max_rank, margin=self.cfg.replan_margin)
        self._apply_assignments(new)
        self.store.event("replan", rnd.round_id, assignments={d: list(v) for d, v in new.items()})
        log.info("round %d re-planned (rank, steps): %s", rnd.round_id, new)

    def _apply_assignments(self, new: dict[str, tuple[int, int]]) -> None:
        """Next rounds' local steps per device, and its rank unless the strategy needs one common rank."""
        common = self.method.common_rank
        for d, (rank, steps) in new.items():
            self._steps[d] = steps
            if not common:
                self.fed.devices[d] = replace(self.fed.devices[d], assigned_rank=rank)

    def _replan_late(self, device_id: str, round_id: int, stats: dict[str, Any]) -> None:
        """Re-fit one straggler from the report its refused late upload carried."""
        from .replan import RoundReport, replan

        dev = self.fed.devices.get(device_id)
        rep = RoundReport.from_stats(stats, dev.assigned_rank) if dev else None
        if rep is None:
            return
        current = {device_id: (dev.assigned_rank, self._steps.get(device_id, self.cfg.local_steps))}
        new = replan({device_id: rep}, self.cfg.round_timeout_s, current, plan_ranks={device_id: dev.plan_rank},
                     target_steps=self.cfg.local_steps, max_rank=self.cfg.max_rank, margin=self.cfg.replan_margin)
        rank, steps = new[device_id]
        self._apply_assignments(new)
        self.store.event("replan", round_id, device_id, assignments={device_id: [rank, steps]}, late=True,
                         reported_train_s=rep.train_time_s, reported_steps=rep.steps)
        log.info("round %d: late device %s re-planned from its report (%.1fs for %d steps): rank %d, %d steps",
                 round_id, device_id, rep.train_time_s, rep.steps, rank, steps)

    def _accepted(self, rnd: R.Round, device_id: str, size: int) -> None:
        self.fed.current = R.accept(rnd, device_id)
        self.store.put_round(self.fed.current)
        self.store.event("upload_accepted", rnd.round_id, device_id, size=size)
        log.info("round %d: update from %s accepted (%d bytes, %d/%d)", rnd.round_id, device_id, size,
                 len(self.fed.current.accepted), len(rnd.selected))

    def close(self) -> None:
        self.store.close()
        self.enrolment.close()
        self.rejections.close()
