"""The coordinator: the round clock and the RPC facade over one lock, the work split by job.

Transport-free: the gRPC servicer (coordinator.server) calls the public methods; every refusal
is a coordinator.errors.CoordinatorError that carries its counted `reason` and its gRPC `code`.
The jobs, each a helper holding a reference to this Coordinator:

- coordinator.config: CoordinatorConfig (re-exported here);
- coordinator.startup: a fresh store or a resumed one;
- coordinator.uploads.Uploads: upload assembly, validation, acceptance (`uploads`);
- coordinator.secagg_rounds.SecAggRounds: secure aggregation over gRPC (`secagg_rounds`);
- coordinator.replanning.Replanner: --replan, out-of-memory step-downs, local steps (`replanner`);
- coordinator.publish.Publisher: streaming fold, aggregation, evaluation, writing the global (`publisher`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import replace
from typing import Any

import torch

from protos import wire

from . import rounds as R
from .aggregation import GlobalState
from .config import CoordinatorConfig
from .engine import RoundEngine
from .enrolment import EnrolmentRegistry
from .errors import UploadRejected, UploadTooLarge
from .methods import make_method
from .metrics import CoordinatorMetrics
from .publish import Publisher
from .replanning import Replanner
from .secagg_round import check_message_size, round_payload
from .secagg_rounds import SecAggRounds
from .server_opt import ServerOptState
from .startup import resume_or_init
from .store import Store
from .uploads import Uploads
from .validation import RejectionLog

__all__ = ["Coordinator", "CoordinatorConfig", "UploadRejected", "UploadTooLarge"]
log = logging.getLogger("coordinator")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Coordinator:
    """Owns the federation state; every public method is thread-safe."""

    global_state: GlobalState
    global_round: int
    target_modules: list[str]

    def __init__(self, cfg: CoordinatorConfig, clock=time.time):
        self.cfg = cfg
        self.clock = clock
        self.method = make_method(cfg.method_config())
        self.policy = cfg.round_policy()  # weights, the devices' recipe, the server optimizer
        self.opt_state = ServerOptState()  # the server optimizer's moments (restored with the global)
        self.fed = R.Federation(cfg.round_config())
        self.store = Store(cfg.store)
        self.defence = cfg.defence_config()
        self.enrolment = EnrolmentRegistry(cfg.store)
        self.rejections = RejectionLog(cfg.store)
        self._lock = threading.RLock()
        self.metrics = CoordinatorMetrics(self)  # Prometheus registry of this instance
        self._tokens: dict[str, str] = {}  # token sha256 -> device id
        self._model = None
        self.uploads = Uploads(self)
        self.secagg_rounds = SecAggRounds(self)
        self.replanner = Replanner(self)
        self.publisher = Publisher(self)
        resume_or_init(self)
        if cfg.secagg:
            check_message_size(round_payload(self.global_state, self.method, [cfg.max_rank], 1))

    def load_model(self):
        """(model, tokenizer) of the base model, loaded once."""
        if self._model is None:
            from .model import load_base_model
            self._model = load_base_model(self.cfg.model, self.cfg.task, self.cfg.num_labels, self.cfg.seed)
        return self._model

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

    # -- downloads: what each selected device trains from -----------------------------------
    def download_id(self, rnd: R.Round, device_id: str) -> str:
        dev = self.fed.devices[device_id]
        mode = self.method.device_mode(dev.mode)
        if self.method.coordinator_keeps(mode):  # a per-device download: it carries what we kept for it
            return f"r{rnd.round_id:04d}-{device_id}"
        return f"r{rnd.round_id:04d}-{mode}-rank{dev.assigned_rank}"

    def engine(self, round_id: int) -> RoundEngine:
        """An empty engine for `round_id` from the current global (downloads, validation)."""
        return RoundEngine(self.method, self.global_state, round_id, self.cfg.norm_bound, self.policy,
                           self.opt_state)

    def _kept(self, device_id: str, mode: str) -> dict[str, torch.Tensor]:
        """What the method keeps on the coordinator for this device: from its last accepted upload."""
        if not self.method.coordinator_keeps(mode):
            return {}
        for u in reversed(self.store.updates()):
            if u["device_id"] == device_id:
                return self.engine(0).kept_from(self.stored_state(u), mode)
        return {}

    def _ensure_downloads(self, rnd: R.Round) -> None:
        for d in rnd.selected:
            did = self.download_id(rnd, d)
            if self.store.download(did):
                continue
            dev = self.fed.devices[d]
            mode = self.method.device_mode(dev.mode)
            engine = self.engine(rnd.round_id)
            tensors = engine.download(dev.assigned_rank, mode, self.cfg.seed + rnd.round_id, self._kept(d, mode))
            self.store.put_download(did, rnd.round_id, engine.blob(tensors, dev.assigned_rank, mode))

    def download_tensors(self, download_id: str) -> dict[str, torch.Tensor]:
        row = self.store.download(download_id)
        if row is None:
            raise R.WrongRound(f"download {download_id!r} does not exist")
        return wire.decode_tensors(self.store.read_blob(row["path"], row["sha256"]))[0]

    def stored_state(self, u: dict[str, Any], sent: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A stored upload's adapter state (ZO: replayed from what the device downloaded, `sent` when
        the caller has read it already)."""
        if u["kind"] != "ZO":
            return wire.decode_tensors(self.store.read_blob(u["path"], u["sha256"]))[0]
        z = json.loads(self.store.read_blob(u["path"], u["sha256"]))
        if sent is None:
            sent = self.download_tensors(u["download_id"])
        return RoundEngine.replay_zo(sent, list(zip(z["seeds"], z["grads"])), z["lr"])

    # -- the round clock --------------------------------------------------------------------
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
                    self.secagg_rounds.tick(rnd, now)
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
            self.secagg_rounds.open(rnd)
        self.store.put_round(rnd)
        self.store.event("round_open", rid, selected=list(rnd.selected))
        log.info("round %d open: %d devices selected, deadline in %.0fs", rid, len(rnd.selected),
                 rnd.deadline - now)

    def _close(self, rnd: R.Round, now: float) -> None:
        rnd = R.close(rnd, self.fed.cfg, now)
        if rnd.state == R.AGGREGATED:
            try:
                self.publisher.aggregate(rnd)
            except (ValueError, RuntimeError) as e:  # keep serving; the round fails visibly
                log.exception("round %d: aggregation failed", rnd.round_id)
                self.store.event("aggregation_failed", rnd.round_id, error=str(e))
                rnd = replace(rnd, state=R.FAILED)
        self.finish_close(rnd)

    def finish_close(self, rnd: R.Round, reason: str = "") -> None:
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
            self.replanner.after_round(rnd)

    def accept_upload(self, rnd: R.Round, device_id: str, size: int) -> None:
        """Count a durably stored upload (or a masked input in the secure sum) as the device's answer."""
        self.fed.current = R.accept(rnd, device_id)
        self.store.put_round(self.fed.current)
        self.store.event("upload_accepted", rnd.round_id, device_id, size=size)
        log.info("round %d: update from %s accepted (%d bytes, %d/%d)", rnd.round_id, device_id, size,
                 len(self.fed.current.accepted), len(rnd.selected))

    # -- RPC facade -------------------------------------------------------------------------
    def register(self, profile_json: str, plan_json: str, enrolment_token: str, device_name: str) -> dict[str, Any]:
        bound = self._check_enrolment(enrolment_token)
        rank, mode = _parse_plan(plan_json)
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

    def _check_enrolment(self, enrolment_token: str) -> tuple[str, str | None] | None:
        """(enrolment token id, device it enrolled) of a per-device token; None for the shared one or open
        enrolment. Raises UnknownDevice (missing/unknown token) or Revoked."""
        shared = bool(self.cfg.enrolment_token) and secrets.compare_digest(enrolment_token.encode(),
                                                                           self.cfg.enrolment_token.encode())
        if enrolment_token and not shared:
            return self.enrolment.verify(enrolment_token)  # unknown -> UNAUTHENTICATED, revoked -> PERMISSION_DENIED
        if not shared and not self.cfg.open_enrolment:
            raise R.UnknownDevice("this coordinator requires an enrolment token; ask the operator "
                                  "(`edge-coordinator enrol --store DIR`) and pass --enrolment-token")
        return None

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
            sa = self.secagg_rounds.of(rnd)
            if sa is not None and sa.phase > 0 and device_id not in sa.members:
                return {**base, "state": "WAIT", "round_id": rnd.round_id,
                        "message": "left out of this round's secure aggregation (too late); wait for the next round"}
            secagg = {"secagg": True, "secagg_params": sa.server.params.to_bytes(),
                      "secagg_payload": sa.payload.to_bytes()} if sa is not None else {}
            did = self.download_id(rnd, device_id)
            row = self.store.download(did)
            mode = self.method.device_mode(dev.mode)
            return {**base, **secagg, "state": "TRAIN", "round_id": rnd.round_id,
                    "local_steps": self.replanner.local_steps(device_id, mode),
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
        return self.uploads.status(device_id, upload_id)

    def upload_append(self, device_id: str, upload_id: str, offset: int, data: bytes, total_size: int) -> int:
        return self.uploads.append(device_id, upload_id, offset, data, total_size)

    def upload_precheck(self, device_id: str, round_id: int, nonce: str, stats: dict[str, Any] | None = None) -> None:
        """Refuse an upload stream at its header (wrong/closed round, stale nonce) before bytes flow."""
        self.uploads.check_header(device_id, round_id, nonce, stats)

    def finish_upload(self, device_id: str, header: dict[str, Any], wire_bytes: int) -> int:
        """Validate the assembled upload and accept it; returns its size."""
        return self.uploads.finish(device_id, header, wire_bytes)

    def submit_zo(self, device_id: str, round_id: int, nonce: str, seeds: list[int], grads: list[float], lr: float,
                  num_examples: int, stats: dict[str, Any], wire_bytes: int) -> int:
        return self.uploads.submit_zo(device_id, round_id, nonce, seeds, grads, lr, num_examples, stats, wire_bytes)

    def secagg_step(self, device_id: str, round_id: int, nonce: str, phase: int, payload: bytes,
                    offset: int = 0, total_bytes: int = 0) -> dict[str, Any]:
        """One SecAggStep (coordinator.secagg_rounds.SecAggRounds.step)."""
        return self.secagg_rounds.step(device_id, round_id, nonce, phase, payload, offset, total_bytes)

    def close(self) -> None:
        self.store.close()
        self.enrolment.close()
        self.rejections.close()


def _parse_plan(plan_json: str) -> tuple[int, str]:
    """(rank, mode) of a device's plan, or UploadRejected (reason bad_plan)."""
    try:
        plan = json.loads(plan_json)
        rank, mode = int(plan["rank"]), str(plan.get("mode", "lora"))
    except (ValueError, KeyError, TypeError) as e:
        raise UploadRejected(f"plan_json is not a plan with 'rank' and 'mode': {e}", reason="bad_plan") from None
    if mode not in ("lora", "zo"):
        raise UploadRejected(f"plan mode {mode!r} is invalid: expected 'lora' or 'zo'", reason="bad_plan")
    return rank, mode
