"""Update validation before acceptance, and the durable per-reason count of everything refused.

`validate_update(state, expected, norm_bound, precision)` checks a decoded LoRA upload
against what the device was assigned: exact keys, shapes for its rank, floating dtypes,
finite values and the Frobenius norm bound. Checksum, size cap and replay (round id +
nonce) are checked by the upload path (coordinator.uploads) before decoding; every refusal
carries a short `reason` label (coordinator.errors) so it can be counted (`reason_of`).

`RejectionLog(store_root)` keeps `reason -> count` (plus the last message) in a table of
the coordinator's SQLite file; `edge-coordinator status` prints it.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import UploadRejected

log = logging.getLogger("coordinator.validation")

REASONS = ("unauthenticated", "permission_denied", "enrolment", "late", "duplicate", "not_selected", "wrong_round",
           "replay", "too_large", "size_mismatch", "checksum", "malformed", "keys", "shape", "dtype", "non_finite",
           "norm_bound", "bad_plan", "other")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class UpdateInvalid(UploadRejected):
    """An upload failed validation; `reason` is one of REASONS (coordinator.errors.UploadRejected)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason=reason)


def validate_update(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], norm_bound: float,
                    precision: str | None = None) -> float:
    """Check a decoded upload; returns its Frobenius norm. Raises UpdateInvalid naming what is wrong.

    state: key -> tensor as decoded (float32 after dequantisation); expected: key -> shape the
    assigned rank implies; precision: the blob's declared upload precision (metadata).
    """
    if precision is not None and precision not in FLOAT_PRECISIONS:
        raise UpdateInvalid("dtype", f"upload precision {precision!r} is not one of {FLOAT_PRECISIONS}")
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise UpdateInvalid("keys", f"upload keys do not match the assigned adapter: missing {missing[:3]}, "
                                    f"unexpected {extra[:3]}")
    total = 0.0
    for k in sorted(state):
        t = state[k]
        if tuple(t.shape) != tuple(expected[k]):
            raise UpdateInvalid("shape", f"upload tensor {k} has shape {tuple(t.shape)}, expected "
                                         f"{tuple(expected[k])} for the assigned rank")
        if not t.is_floating_point():
            raise UpdateInvalid("dtype", f"upload tensor {k} has dtype {t.dtype}; expected a floating type")
        if not bool(torch.isfinite(t).all()):
            raise UpdateInvalid("non_finite", f"upload tensor {k} contains non-finite values (nan/inf)")
        total += float(t.double().pow(2).sum())
    norm = total ** 0.5
    if not norm <= norm_bound:
        raise UpdateInvalid("norm_bound", f"upload norm {norm:.3g} exceeds the bound {norm_bound:.3g} "
                                          "(--norm-bound)")
    return norm


def reason_of(exc: BaseException) -> str:
    """A bounded label (one of REASONS) for why a request was refused: the error's own `reason`
    (coordinator.errors.CoordinatorError), else "malformed" for a ValueError and "other" otherwise."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason in REASONS:
        return reason
    return "malformed" if isinstance(exc, ValueError) else "other"


class RejectionLog:
    """Durable `reason -> count` in the store's SQLite file (own connection, thread-safe)."""

    def __init__(self, store_root: str | Path):
        path = Path(store_root) / "coordinator.sqlite"
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # counters: durable at the next checkpoint is enough
        self.db.execute("CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL, "
                        "last_detail TEXT, last_ts REAL)")

    def record(self, reason: str, detail: str = "", rpc: str = "", device_id: str | None = None) -> None:
        log.warning("rejected %s%s [%s]: %s", rpc or "request", f" from {device_id}" if device_id else "", reason,
                    detail[:300])
        with self._lock:
            self.db.execute("INSERT INTO rejections(reason, count, last_detail, last_ts) VALUES (?, 1, ?, ?) "
                            "ON CONFLICT(reason) DO UPDATE SET count = count + 1, last_detail = excluded.last_detail, "
                            "last_ts = excluded.last_ts", (reason, detail[:500], time.time()))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.db.execute("SELECT reason, count FROM rejections ORDER BY reason").fetchall())

    def close(self) -> None:
        with self._lock:
            self.db.close()


def read_rejections(store_root: str | Path) -> dict[str, int]:
    """The counts of a store on disk ({} for a store that never refused anything)."""
    db = sqlite3.connect(Path(store_root) / "coordinator.sqlite", timeout=30)
    try:
        return dict(db.execute("SELECT reason, count FROM rejections ORDER BY reason").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()
