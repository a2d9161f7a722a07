"""Upload assembly and acceptance (`Uploads`, one per Coordinator).

A LoRA upload streams in as chunks appended to a partial file per (device, upload id) — resumable
from `status` — and is accepted by `finish`: size and checksum against the header, decoded, then
validated by the one validation path, `RoundEngine.validate` (keys, shapes, dtypes, finite, norm).
A ZO update (`submit_zo`) is replayed from what the device downloaded and validated the same way.
Either is stored durably before it counts as accepted and is folded into the round's aggregate.
Refusals are coordinator.errors.CoordinatorError (UploadRejected, UploadTooLarge, RoundError).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from protos import wire

from . import rounds as R
from .publish import loss_of, progress_of
from .engine import RoundEngine
from .errors import UploadRejected, UploadTooLarge
from .secagg_round import SecAggRejected
from .validation import reason_of

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator")


def _key(device_id: str, upload_id: str) -> str:
    return f"{device_id}_{upload_id}"


class Uploads:
    """The upload RPCs' work: partial files, the checks before and after the bytes, acceptance."""

    def __init__(self, c: Coordinator):
        self.c = c
        self._locks: dict[str, threading.Lock] = {}  # device id -> its partial-upload files' lock

    def _device_lock(self, device_id: str) -> threading.Lock:
        with self.c._lock:
            return self._locks.setdefault(device_id, threading.Lock())

    # -- streaming the bytes ----------------------------------------------------------------
    def status(self, device_id: str, upload_id: str) -> int:
        return self.c.store.partial_size(_key(device_id, upload_id))

    def append(self, device_id: str, upload_id: str, offset: int, data: bytes, total_size: int) -> int:
        cap = self.c.cfg.max_upload_bytes
        if total_size > cap:
            raise UploadTooLarge(f"upload of {total_size} bytes exceeds the {cap}-byte cap; "
                                 "lower the rank or use a lower upload precision")
        if offset + len(data) > total_size:
            raise UploadRejected(f"chunk at offset {offset} (+{len(data)} bytes) runs past the declared total "
                                 f"size {total_size}", reason="size_mismatch")
        store = self.c.store
        with self._device_lock(device_id):
            if offset == 0:  # a device has one upload in flight: forget its abandoned partials (bounded disk)
                keep = _key(device_id, upload_id) + ".part"
                for p in (store.root / "partial").glob(f"{device_id}_*.part"):
                    if p.name != keep:
                        p.unlink(missing_ok=True)
            return store.append_partial(_key(device_id, upload_id), offset, data)  # UploadRejected on a gap

    # -- the checks -------------------------------------------------------------------------
    def precheck(self, device_id: str, round_id: int, nonce: str) -> R.Round:
        """The open round this upload is for, or the error that refuses it (a late one is counted)."""
        c = self.c
        if c.cfg.secagg:  # an unmasked individual update must never reach this coordinator
            raise SecAggRejected("this coordinator runs secure aggregation (--secagg): send the update through "
                                 "SecAggStep as the task says, not UploadUpdate / SubmitZO")
        rnd = c.fed.current
        try:
            R.check_upload(rnd, round_id, device_id, nonce)
        except R.LateUpload:
            if rnd is not None and round_id <= rnd.round_id:
                if rnd.round_id == round_id:
                    c.fed.current = R.count_late(rnd)
                    c.store.put_round(c.fed.current)
                c.store.event("late_upload", round_id, device_id)
                log.info("round %d: late upload from %s rejected", round_id, device_id)
            raise
        return rnd

    def check_header(self, device_id: str, round_id: int, nonce: str, stats: dict[str, Any] | None = None) -> None:
        """Refuse an upload stream at its header (wrong/closed round, stale nonce) before bytes flow.

        A late upload's header still carries the device's measurements (`stats`): with --replan
        they re-plan that straggler at once, the device that most needs it."""
        c = self.c
        with c._lock:
            try:
                self.precheck(device_id, round_id, nonce)
            except R.LateUpload:
                if stats and c.cfg.replan:
                    c.replanner.late(device_id, round_id, stats)
                raise

    # -- acceptance -------------------------------------------------------------------------
    def finish(self, device_id: str, header: dict[str, Any], wire_bytes: int) -> int:
        """Validate the assembled upload and accept it; returns its size. Raises domain errors."""
        c = self.c
        key = _key(device_id, header["upload_id"])
        with c._lock:
            try:
                rnd = self.precheck(device_id, header["round_id"], header["nonce"])
            except R.RoundError:
                c.store.drop_partial(key)
                raise
            with self._device_lock(device_id):
                data = c.store.take_partial(key)
            if len(data) < header["total_size"]:  # an interrupted stream: keep the bytes so the device can resume
                e = UploadRejected(f"received {len(data)} bytes but the header declared {header['total_size']}; "
                                   f"resume from UploadStatus (offset {len(data)})", reason="size_mismatch")
                c.store.event("upload_incomplete", rnd.round_id, device_id, reason=e.reason, detail=str(e)[:300])
                raise e
            did = c.download_id(rnd, device_id)
            try:
                state, sent = self._checked(rnd, device_id, did, header, data)
            except UploadRejected as e:
                c.store.drop_partial(key)
                c.store.event("upload_rejected", rnd.round_id, device_id, reason=e.reason, detail=str(e)[:300])
                raise
            stats = header.get("stats", {})
            c.store.put_update(rnd.round_id, device_id, header["nonce"], "LORA", data, ".safetensors", wire_bytes,
                               int(stats.get("num_examples", 1)), did, stats)
            c.store.drop_partial(key)
            self._accept(rnd, device_id, len(data), state, int(stats.get("num_examples", 1)), stats, sent)
        c.tick()
        return len(data)

    def _checked(self, rnd: R.Round, device_id: str, download_id: str, header: dict[str, Any], data: bytes):
        """(decoded adapter state, what the device downloaded) of a complete upload, or UploadRejected."""
        c = self.c
        if len(data) != header["total_size"]:
            raise UploadRejected(f"received {len(data)} bytes but the header declared {header['total_size']}; "
                                 "upload again from offset 0", reason="size_mismatch")
        if wire.sha256_hex(data) != header["sha256"]:
            raise UploadRejected("upload sha256 does not match the header's checksum (corrupted transfer); "
                                 "upload again", reason="checksum")
        try:
            state, meta = wire.decode_tensors(data)
        except (wire.WireError, ValueError, RuntimeError, KeyError) as e:
            raise UploadRejected(f"upload is not a valid tensor blob: {e}") from None
        mode = c.method.device_mode(c.fed.devices[device_id].mode)
        sent = c.download_tensors(download_id)
        c.engine(rnd.round_id).validate(state, sent, mode, meta.get("precision"))  # UpdateInvalid (an UploadRejected)
        return state, sent

    def submit_zo(self, device_id: str, round_id: int, nonce: str, seeds: list[int], grads: list[float], lr: float,
                  num_examples: int, stats: dict[str, Any], wire_bytes: int) -> int:
        c = self.c
        with c._lock:
            rnd = self.precheck(device_id, round_id, nonce)
            if len(seeds) != len(grads) or not seeds:
                raise UploadRejected(f"ZO update needs as many seeds as grads (>= 1); got {len(seeds)} and {len(grads)}")
            if not all(map(lambda g: g == g and abs(g) != float("inf"), grads)) or not (lr == lr and 0 < abs(lr) < 1e6):
                raise UploadRejected("ZO update has a non-finite projected gradient or learning rate",
                                     reason="non_finite")
            did = c.download_id(rnd, device_id)
            sent = c.download_tensors(did)
            final = RoundEngine.replay_zo(sent, list(zip(seeds, grads)), lr)
            mode = c.method.device_mode(c.fed.devices[device_id].mode)
            try:
                c.engine(round_id).validate(final, sent, "zo")
            except ValueError as e:
                raise UploadRejected(f"replayed ZO update is invalid: {e}", reason=reason_of(e)) from None
            data = json.dumps({"seeds": list(seeds), "grads": list(grads), "lr": lr, "mode": mode}).encode()
            c.store.put_update(round_id, device_id, nonce, "ZO", data, ".zo.json", wire_bytes, int(num_examples),
                               did, stats)
            self._accept(rnd, device_id, len(data), final, int(num_examples), stats, sent)
        c.tick()
        return len(data)

    def _accept(self, rnd: R.Round, device_id: str, size: int, state, weight: int, stats: dict[str, Any],
                sent: dict[str, Any]) -> None:
        """A durably stored upload counts: its reported plan noted, the round told, the aggregate folded."""
        c = self.c
        c.replanner.note_plan(device_id, stats)
        c.accept_upload(rnd, device_id, size)
        mode = c.method.device_mode(c.fed.devices[device_id].mode)
        c.publisher.fold_accepted(rnd, device_id, state, weight, mode, progress_of(stats), sent, loss_of(stats))
