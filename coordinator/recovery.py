"""Start-up recovery: find the newest global checkpoint whose bytes still match their sha256.

Every global is written tmp + fsync + rename with its sha256 in SQLite (`meta.global` and
`rounds.global_sha256`). If the newest one no longer matches (disk corruption, a truncated
copy), the coordinator falls back to the previous aggregated round's global, marks the
corrupted rounds failed (they do not count toward --rounds, so they run again) and records a
`checkpoint_corrupt` event.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from . import rounds as R
from .engine import global_from_bytes
from .aggregation import GlobalState
from .store import Store, StoreError, round_dir

log = logging.getLogger("coordinator.recovery")


@dataclass(frozen=True)
class Recovered:
    round_id: int  # round whose global is in use (0 = initial)
    state: GlobalState
    corrupted: tuple[int, ...]  # rounds whose global failed its checksum


def _load(store: Store, rel: str, sha: str) -> GlobalState:
    return global_from_bytes(store.read_blob(rel, sha))


def load_global(store: Store) -> Recovered:
    """The newest intact global; raises StoreError when none (not even round 0) is intact."""
    ptr = store.get_meta("global")
    try:
        return Recovered(int(ptr["round_id"]), _load(store, ptr["path"], ptr["sha256"]), ())
    except (StoreError, ValueError, KeyError, TypeError) as e:
        log.error("global checkpoint of round %s is unusable: %s", (ptr or {}).get("round_id"), e)
        first_bad = int(ptr["round_id"]) if ptr else 10 ** 9
    corrupted = [first_bad]
    candidates = [r for r in reversed(store.rounds()) if r["round_id"] < first_bad]
    for row in candidates:
        if row["state"] != R.AGGREGATED or not row["global_path"]:
            continue
        try:
            g = _load(store, row["global_path"], row["global_sha256"])
        except (StoreError, ValueError) as e:
            log.error("global checkpoint of round %d is unusable too: %s", row["round_id"], e)
            corrupted.append(row["round_id"])
            continue
        return _fall_back(store, row["round_id"], row["global_path"], row["global_sha256"], g, corrupted)
    init = store.rel(round_dir(store.root, 0) / "global.safetensors")
    init_sha = store.get_meta("initial_global_sha256")
    try:  # round 0 has no rounds row; its file is still checksummed when we recorded it
        g = _load(store, init, init_sha)
    except (StoreError, ValueError) as e:
        raise StoreError(f"no intact global checkpoint in {store.root} (rounds {corrupted} corrupted, initial: {e}); "
                         "restore the store from a backup or start a new --store") from None
    return _fall_back(store, 0, init, init_sha, g, corrupted)


def _fall_back(store: Store, round_id: int, rel: str, sha: str | None, g: GlobalState,
               corrupted: list[int]) -> Recovered:
    rows = {r["round_id"]: r for r in store.rounds()}
    for rid in corrupted:
        if rid in rows and rows[rid]["state"] == R.AGGREGATED:
            rnd = store.load_round(rows[rid], [])
            store.put_round(replace(rnd, state=R.FAILED))
    store.set_meta("global", {"round_id": round_id, "path": rel, "sha256": sha})
    store.event("checkpoint_corrupt", round_id, corrupted=corrupted, using=round_id)
    log.warning("falling back to the global of round %d (corrupted: %s)", round_id, corrupted)
    return Recovered(round_id, g, tuple(corrupted))
