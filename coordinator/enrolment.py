"""Device enrolment: single-use enrolment tokens issued by an admin, stored hashed, revocable.

A token reads `et_<id>.<secret>`: `id` (public, 8 hex chars) finds the row, `secret` (32
random bytes, urlsafe) is checked against its scrypt hash (n=2**14, r=8, p=1, 16-byte salt)
in the `enrolment` table of the store's SQLite file. Only the hash is stored; the token is
printed once by `edge-coordinator enrol`. The first Register with a token binds it to that
device; the device may register again with the same token (restart), nobody else may.
Revoking a token id or a device id refuses that device from then on (PERMISSION_DENIED),
including a coordinator that is running: it re-reads the revocations at most every second.

Device tokens (from Register, sent as `authorization: Bearer` on every call) are 256-bit
random and stored as sha256 in the `devices` table; a slow hash is not needed for them.
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .rounds import RoundError, UnknownDevice

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
PREFIX = "et_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolment (
  token_id TEXT PRIMARY KEY, salt BLOB NOT NULL, hash BLOB NOT NULL, created_at REAL NOT NULL,
  device_id TEXT, bound_at REAL, revoked_at REAL, note TEXT);
CREATE TABLE IF NOT EXISTS revoked_devices (device_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL);
"""


class Revoked(RoundError):
    """A revoked enrolment token or device."""

    code = "PERMISSION_DENIED"
    reason = "permission_denied"


class BadEnrolment(UnknownDevice):
    """Missing, unknown or wrong enrolment token."""

    reason = "enrolment"


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, maxmem=64 << 20, **SCRYPT)


def split_token(token: str) -> tuple[str, str]:
    """(token id, secret) of `et_<id>.<secret>`; raises BadEnrolment for anything else."""
    if not token.startswith(PREFIX) or "." not in token or len(token) > 200:
        raise BadEnrolment("enrolment token is missing or malformed; ask the operator for one "
                           "(`edge-coordinator enrol --store DIR`)")
    tid, secret = token[len(PREFIX):].split(".", 1)
    return tid, secret


class EnrolmentRegistry:
    """The enrolment tables of one store (own SQLite connection; safe across threads and processes)."""

    def __init__(self, store_root: str | Path, cache_s: float = 1.0):
        root = Path(store_root)
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(root / "coordinator.sqlite", check_same_thread=False, isolation_level=None,
                                  timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.cache_s = cache_s
        self._revoked: frozenset[str] = frozenset()
        self._revoked_at = -1e18

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- admin ------------------------------------------------------------------------------
    def issue(self, count: int = 1, note: str = "") -> list[str]:
        """`count` new tokens (returned once, stored hashed)."""
        if count < 1 or count > 10_000:
            raise ValueError(f"--count {count}: issue between 1 and 10000 tokens at a time")
        out = []
        for _ in range(count):
            tid, secret, salt = secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_bytes(16)
            self._q("INSERT INTO enrolment(token_id, salt, hash, created_at, note) VALUES (?,?,?,?,?)",
                    (tid, salt, _hash(secret, salt), time.time(), note))
            out.append(f"{PREFIX}{tid}.{secret}")
        return out

    def revoke(self, subject: str) -> list[str]:
        """Revoke a token id (`et_` prefix optional) or a device id; returns the device ids now refused."""
        sid = subject[len(PREFIX):] if subject.startswith(PREFIX) else subject
        sid = sid.split(".", 1)[0]
        now = time.time()
        rows = self._q("SELECT token_id, device_id FROM enrolment WHERE token_id=? OR device_id=?", (sid, subject))
        known_device = self._q("SELECT 1 FROM devices WHERE device_id=?", (subject,)) if self._has_devices() else []
        if not rows and not known_device:
            raise ValueError(f"--revoke {subject!r}: no enrolment token or device with that id in this store")
        devices = {d for _, d in rows if d} | ({subject} if known_device else set())
        for tid, _ in rows:
            self._q("UPDATE enrolment SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL", (now, tid))
        for d in devices:
            self._q("INSERT OR IGNORE INTO revoked_devices VALUES (?, ?)", (d, now))
        self._revoked_at = -1e18
        return sorted(devices)

    def _has_devices(self) -> bool:
        return bool(self._q("SELECT 1 FROM sqlite_master WHERE type='table' AND name='devices'"))

    def tokens(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT token_id, created_at, device_id, bound_at, revoked_at, note FROM enrolment "
                       "ORDER BY created_at")
        keys = ("token_id", "created_at", "device_id", "bound_at", "revoked_at", "note")
        return [dict(zip(keys, r)) for r in rows]

    # -- coordinator --------------------------------------------------------------------------
    def verify(self, token: str) -> tuple[str, str | None]:
        """(token id, device id it is bound to or None). Raises BadEnrolment / Revoked."""
        tid, secret = split_token(token)
        rows = self._q("SELECT salt, hash, device_id, revoked_at FROM enrolment WHERE token_id=?", (tid,))
        if not rows or not secrets.compare_digest(_hash(secret, rows[0][0]), rows[0][1]):
            raise BadEnrolment("enrolment token is unknown or wrong; ask the operator for a valid one")
        if rows[0][3] is not None:
            raise Revoked(f"enrolment token et_{tid} has been revoked; ask the operator for a new one")
        return tid, rows[0][2]

    def bind(self, token_id: str, device_id: str) -> None:
        """Record the device a token enrolled (first use only)."""
        self._q("UPDATE enrolment SET device_id=?, bound_at=? WHERE token_id=? AND device_id IS NULL",
                (device_id, time.time(), token_id))

    def token_of(self, device_id: str) -> str | None:
        """The enrolment token id a device enrolled with, if any."""
        rows = self._q("SELECT token_id FROM enrolment WHERE device_id=?", (device_id,))
        return rows[0][0] if rows else None

    def revoked_devices(self) -> frozenset[str]:
        """Revoked device ids, re-read from SQLite at most every `cache_s` seconds."""
        now = time.monotonic()
        if now - self._revoked_at > self.cache_s:
            self._revoked = frozenset(d for (d,) in self._q("SELECT device_id FROM revoked_devices"))
            self._revoked_at = now
        return self._revoked

    def check_device(self, device_id: str) -> None:
        if device_id in self.revoked_devices():
            raise Revoked(f"device {device_id} has been revoked by the operator; it may no longer take part")
