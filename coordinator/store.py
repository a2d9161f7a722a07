"""Durable coordinator state: SQLite metadata + safetensors blobs written atomically.

Layout under the store directory:
  coordinator.sqlite                    devices, rounds, updates, downloads, events, meta
  rounds/NNNN/global.safetensors        global state after round NNNN (0000 = initial)
  rounds/NNNN/peft/                     the same global exported as a peft adapter
  rounds/NNNN/downloads/<id>.safetensors   exactly what a device downloaded
  rounds/NNNN/updates/<device>.safetensors accepted uploads (LoRA) / .json (ZO pairs)
  partial/<upload_id>.part              uploads in flight (resumable)
Every blob is written tmp + fsync + os.replace and its sha256 recorded in SQLite; a blob
whose bytes no longer match its recorded sha256 is refused on read.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from protos.wire import sha256_hex

from .errors import UploadRejected
from .rounds import Device, Round

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, token_sha256 TEXT NOT NULL,
  plan_rank INTEGER NOT NULL, mode TEXT NOT NULL, assigned_rank INTEGER NOT NULL,
  last_seen REAL NOT NULL, registered_at REAL NOT NULL, profile_json TEXT, plan_json TEXT);
CREATE TABLE IF NOT EXISTS rounds (
  round_id INTEGER PRIMARY KEY, state TEXT NOT NULL, opened_at REAL NOT NULL, deadline REAL NOT NULL,
  closed_at REAL, selected_json TEXT NOT NULL, nonces_json TEXT NOT NULL, dropped_json TEXT NOT NULL DEFAULT '[]',
  late INTEGER NOT NULL DEFAULT 0, global_path TEXT, global_sha256 TEXT, metrics_json TEXT);
CREATE TABLE IF NOT EXISTS updates (
  round_id INTEGER NOT NULL, device_id TEXT NOT NULL, nonce TEXT NOT NULL, kind TEXT NOT NULL,
  path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, wire_bytes INTEGER NOT NULL,
  num_examples INTEGER NOT NULL, download_id TEXT, stats_json TEXT, accepted_at REAL NOT NULL,
  PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS downloads (
  download_id TEXT PRIMARY KEY, round_id INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
  size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, round_id INTEGER,
  device_id TEXT, detail_json TEXT);
"""


class StoreError(RuntimeError):
    """The store on disk is inconsistent (missing or corrupted blob)."""


def atomic_write(path: Path, data: bytes) -> str:
    """Write bytes durably (tmp + fsync + os.replace + dir fsync); returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return sha256_hex(data)


def round_dir(root: Path, round_id: int) -> Path:
    return root / "rounds" / f"{round_id:04d}"


class Store:
    """Thread-safe wrapper over one SQLite file and the blob directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "partial").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.root / "coordinator.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- generic ------------------------------------------------------------------------
    def _exec(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def write_blob(self, rel_path: str, data: bytes) -> str:
        return atomic_write(self.root / rel_path, data)

    def read_blob(self, rel_path: str, sha256: str | None = None) -> bytes:
        p = self.root / rel_path
        if not p.exists():
            raise StoreError(f"blob {p} is missing from the store")
        data = p.read_bytes()
        if sha256 and sha256_hex(data) != sha256:
            raise StoreError(f"blob {p} does not match its recorded sha256 (corrupted store?)")
        return data

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._exec("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_meta(self, key: str, value: Any) -> None:
        self._exec("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- events -------------------------------------------------------------------------
    def event(self, kind: str, round_id: int | None = None, device_id: str | None = None, **detail: Any) -> None:
        self._exec("INSERT INTO events(ts, kind, round_id, device_id, detail_json) VALUES (?,?,?,?,?)",
                   (time.time(), kind, round_id, device_id, json.dumps(detail, default=str)))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT ts, kind, round_id, device_id, detail_json FROM events"
        rows = self._exec(sql + (" WHERE kind=?" if kind else "") + " ORDER BY id", (kind,) if kind else ())
        return [dict(ts=r[0], kind=r[1], round_id=r[2], device_id=r[3], **json.loads(r[4] or "{}")) for r in rows]

    # -- devices ------------------------------------------------------------------------
    def put_device(self, d: Device, token_sha256: str, profile_json: str = "", plan_json: str = "") -> None:
        self._exec("INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (d.device_id, d.name, token_sha256, d.plan_rank, d.mode, d.assigned_rank, d.last_seen,
                    d.registered_at, profile_json, plan_json))

    def devices(self) -> dict[str, tuple[Device, str]]:
        rows = self._exec("SELECT device_id, name, plan_rank, mode, assigned_rank, last_seen, registered_at, "
                          "token_sha256 FROM devices")
        return {r[0]: (Device(*r[:7]), r[7]) for r in rows}

    def device_plan(self, device_id: str) -> dict[str, Any]:
        rows = self._exec("SELECT plan_json FROM devices WHERE device_id=?", (device_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else {}

    # -- rounds -------------------------------------------------------------------------
    def put_round(self, r: Round) -> None:
        with self._lock:
            old = self._exec("SELECT global_path, global_sha256, metrics_json FROM rounds WHERE round_id=?",
                             (r.round_id,))
            g = old[0] if old else (None, None, None)
            self._exec("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (r.round_id, r.state, r.opened_at, r.deadline, r.closed_at, json.dumps(list(r.selected)),
                        json.dumps(r.nonces), json.dumps(list(r.dropped)), r.late, *g))

    def set_round_global(self, round_id: int, rel_path: str, sha256: str, metrics: dict[str, Any]) -> None:
        self._exec("UPDATE rounds SET global_path=?, global_sha256=?, metrics_json=? WHERE round_id=?",
                   (rel_path, sha256, json.dumps(metrics), round_id))

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._exec("SELECT round_id, state, opened_at, deadline, closed_at, selected_json, nonces_json, "
                          "dropped_json, late, global_path, global_sha256, metrics_json FROM rounds ORDER BY round_id")
        out = []
        for r in rows:
            out.append(dict(round_id=r[0], state=r[1], opened_at=r[2], deadline=r[3], closed_at=r[4],
                            selected=json.loads(r[5]), nonces=json.loads(r[6]), dropped=json.loads(r[7]),
                            late=r[8], global_path=r[9], global_sha256=r[10],
                            metrics=json.loads(r[11]) if r[11] else {}))
        return out

    def load_round(self, row: dict[str, Any], accepted: list[str]) -> Round:
        return Round(round_id=row["round_id"], opened_at=row["opened_at"], deadline=row["deadline"],
                     selected=tuple(row["selected"]), nonces=dict(row["nonces"]), accepted=tuple(accepted),
                     dropped=tuple(row["dropped"]), late=row["late"], state=row["state"], closed_at=row["closed_at"])

    # -- updates ------------------------------------------------------------------------
    def put_update(self, round_id: int, device_id: str, nonce: str, kind: str, data: bytes, suffix: str,
                   wire_bytes: int, num_examples: int, download_id: str, stats: dict[str, Any]) -> str:
        """Write an accepted upload durably, then record it (the file exists before the row)."""
        rel = self.rel(round_dir(self.root, round_id) / "updates" / f"{device_id}{suffix}")
        sha = self.write_blob(rel, data)
        self._exec("INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (round_id, device_id, nonce, kind, rel, sha, len(data), wire_bytes, num_examples, download_id,
                    json.dumps(stats), time.time()))
        return sha

    def updates(self, round_id: int | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT round_id, device_id, nonce, kind, path, sha256, size, wire_bytes, num_examples, download_id, "
               "stats_json, accepted_at FROM updates")
        rows = self._exec(sql + (" WHERE round_id=? ORDER BY accepted_at" if round_id is not None else " ORDER BY round_id"),
                          (round_id,) if round_id is not None else ())
        keys = ("round_id", "device_id", "nonce", "kind", "path", "sha256", "size", "wire_bytes", "num_examples",
                "download_id", "stats", "accepted_at")
        out = [dict(zip(keys, r)) for r in rows]
        for u in out:
            u["stats"] = json.loads(u["stats"] or "{}")
        return out

    # -- downloads ----------------------------------------------------------------------
    def put_download(self, download_id: str, round_id: int, data: bytes) -> tuple[str, int]:
        existing = self.download(download_id)
        if existing:
            return existing["sha256"], existing["size"]
        rel = self.rel(round_dir(self.root, round_id) / "downloads" / f"{download_id}.safetensors")
        sha = self.write_blob(rel, data)
        self._exec("INSERT OR REPLACE INTO downloads VALUES (?,?,?,?,?)", (download_id, round_id, rel, sha, len(data)))
        return sha, len(data)

    def download(self, download_id: str) -> dict[str, Any] | None:
        rows = self._exec("SELECT download_id, round_id, path, sha256, size FROM downloads WHERE download_id=?",
                          (download_id,))
        return dict(zip(("download_id", "round_id", "path", "sha256", "size"), rows[0])) if rows else None

    # -- partial uploads ----------------------------------------------------------------
    def partial_path(self, upload_id: str) -> Path:
        if not upload_id or not all(c.isalnum() or c in "-_" for c in upload_id) or len(upload_id) > 96:
            raise UploadRejected(f"upload_id {upload_id!r} is invalid: use 1-96 letters, digits, '-' or '_'")
        return self.root / "partial" / f"{upload_id}.part"

    def partial_size(self, upload_id: str) -> int:
        p = self.partial_path(upload_id)
        return p.stat().st_size if p.exists() else 0

    def append_partial(self, upload_id: str, offset: int, data: bytes) -> int:
        """Append bytes at `offset` (the current size, or 0 to restart); fsync; returns the new size."""
        p = self.partial_path(upload_id)
        size = p.stat().st_size if p.exists() else 0
        if offset == 0 and size:  # the client restarted this upload from scratch
            p.unlink()
            size = 0
        if offset != size:
            raise UploadRejected(f"upload {upload_id}: chunk offset {offset} does not match the {size} bytes "
                                 "received; ask UploadStatus for the resume offset", reason="size_mismatch")
        with open(p, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return size + len(data)

    def take_partial(self, upload_id: str) -> bytes:
        p = self.partial_path(upload_id)
        data = p.read_bytes() if p.exists() else b""
        return data

    def drop_partial(self, upload_id: str) -> None:
        self.partial_path(upload_id).unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        """Everything `edge-coordinator status` shows."""
        devs = [asdict(d) for d, _ in self.devices().values()]
        ups = self.updates()
        return {"config": self.get_meta("config", {}), "rounds": self.rounds(), "devices": devs,
                "updates": [{k: u[k] for k in ("round_id", "device_id", "kind", "size", "wire_bytes", "num_examples",
                                               "stats")} for u in ups],
                "late_uploads": len(self.events("late_upload")),
                "bytes_uploaded": int(sum(u["wire_bytes"] for u in ups))}
