"""Coordinator start-up: a fresh store (initial global from the base model) or a resumed one.

`resume_or_init(c)` fills `c.target_modules`, `c.global_state`, `c.global_round` and, on a
resumed store, the devices, their tokens and the round state (an open round resumes with its
accepted updates and a fresh deadline). Runs from `Coordinator.__init__`, before any RPC.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from . import rounds as R
from .recovery import load_global

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator")
PINNED = ("strategy", "max_rank", "task", "lora_alpha", "use_rslora")  # settings a store is created with


def resume_or_init(c: Coordinator) -> None:
    saved = c.store.get_meta("config")
    if saved is not None:
        _resume(c, saved)
    else:
        _init(c)
    if c.cfg.eval_data and c.global_round == 0 and not c.store.get_meta("initial_metrics"):
        c.store.set_meta("initial_metrics", c.publisher.evaluate(c.global_state))


def _resume(c: Coordinator, saved: dict) -> None:
    cfg = asdict(c.cfg)
    for key in PINNED:
        if saved.get(key) != cfg.get(key):
            raise ValueError(f"store {c.cfg.store} was created with {key}={saved.get(key)!r}, not "
                             f"{cfg.get(key)!r}; use a new --store or the same settings")
    c.target_modules = saved["target_modules"]
    recovered = load_global(c.store)  # newest global that passes its checksum
    c.global_state, c.global_round = recovered.state, recovered.round_id
    _restore_server_opt(c)
    _restore_rounds(c)
    log.info("resumed store %s at round %d (%d aggregated)", c.cfg.store, c.fed.last_round_id, c.fed.completed)
    c.store.event("resume", c.fed.last_round_id)


def _init(c: Coordinator) -> None:
    from .init_global import initial_global
    from .model import initial_adapter_state, resolve_target_modules

    model, _ = c.load_model()
    c.target_modules = resolve_target_modules(model, c.cfg.target_modules or None)
    init = initial_adapter_state(model, c.target_modules, c.cfg.max_rank, c.cfg.lora_alpha, c.cfg.use_rslora,
                                 c.cfg.seed, c.method.peft, c.method.virtual_tokens, c.method.bottleneck)
    c.global_state = initial_global(c.method, init, model.state_dict())
    c.global_round = 0
    c.publisher.write_global(0, {})
    meta = asdict(c.cfg)
    meta["target_modules"] = c.target_modules
    c.store.set_meta("config", meta)
    c.store.event("init", 0, strategy=c.cfg.strategy, target_modules=c.target_modules)


def _restore_rounds(c: Coordinator) -> None:
    for dev, token_sha in c.store.devices().values():
        c.fed.devices[dev.device_id] = dev
        c._tokens[token_sha] = dev.device_id
    rows = c.store.rounds()
    c.fed.completed = sum(r["state"] == R.AGGREGATED for r in rows)
    c.fed.last_round_id = rows[-1]["round_id"] if rows else 0
    if not rows:
        return
    last = rows[-1]
    accepted = [u["device_id"] for u in c.store.updates(last["round_id"])]
    rnd = c.store.load_round(last, accepted)
    if rnd.state == R.OPEN:  # resume the open round with its accepted updates; fresh deadline
        now = c.clock()
        rnd = replace(rnd, deadline=now + c.cfg.round_timeout_s)
        for d in rnd.selected:  # devices get a grace period to come back
            if d in c.fed.devices:
                c.fed.devices[d] = replace(c.fed.devices[d], last_seen=now)
        c.store.put_round(rnd)
    c.fed.current = rnd


def _restore_server_opt(c: Coordinator) -> None:
    """The server optimizer's moments written with the global in use (fresh ones when they are missing)."""
    ptr = c.store.get_meta("server_opt")
    if not c.policy.server_opt.active or not ptr:
        return
    if int(ptr["round_id"]) != c.global_round:
        log.warning("server optimizer state is from round %s, the global from round %d: starting fresh moments",
                    ptr["round_id"], c.global_round)
        return
    from protos import wire

    from .server_opt import state_from_tensors
    c.opt_state = state_from_tensors(wire.decode_tensors(c.store.read_blob(ptr["path"], ptr["sha256"]))[0])
