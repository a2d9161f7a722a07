"""Closing a round's maths: the streaming fold of accepted uploads, aggregation (plain or defended),
evaluation, and durably writing the new global (`Publisher`, one per Coordinator).

Every method runs under the coordinator's lock. The fold of the open round is kept in memory
(`fold`) and rebuilt from the durable uploads when it is missing or stale (after a restart).
"""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from protos import wire
from protos.pooling import NORMALIZED_SCALE, checkpoint_pooling

from . import rounds as R
from .aggregation import GlobalState
from .defences import RoundUpload, defended_round, dp_epsilon
from .engine import RoundEngine, global_to_bytes
from .server_opt import state_to_tensors
from .store import round_dir

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator")


class Publisher:
    """Aggregates a closed round into the coordinator's global state and publishes it."""

    def __init__(self, c: Coordinator):
        self.c = c
        self.fold: RoundEngine | None = None  # streaming aggregate of the open round
        self._evaluator = None
        pooling = checkpoint_pooling(c.cfg.model) if c.cfg.task == "classification" else None
        self._pooling_json = json.dumps({"mode": pooling[0], "normalize": pooling[1], "scale": (
            NORMALIZED_SCALE if pooling[1] else 1.0), "load_with": (
            "protos.pooling.use_checkpoint_pooling(model, base_model_dir)")}).encode() if pooling else b""

    # -- the round's streaming aggregate ----------------------------------------------------
    def stored_uploads(self, round_id: int):
        """Yield this round's accepted uploads from disk, decoded one at a time (ZO: replayed)."""
        for u in self.c.store.updates(round_id):
            yield RoundUpload(u["device_id"], self.c.stored_state(u), float(max(u["num_examples"], 1)))

    def round_fold(self, rnd: R.Round) -> RoundEngine:
        """The streaming aggregate of `rnd`; rebuilt from the durable uploads when missing or stale
        (each upload folded against what its device downloaded, read once)."""
        c = self.c
        rows = c.store.updates(rnd.round_id)
        fold = self.fold
        if fold is None or fold.round_id != rnd.round_id or fold.devices != {u["device_id"] for u in rows}:
            fold = c.engine(rnd.round_id)
            for u in rows:
                sent = c.download_tensors(u["download_id"])
                fold.fold(u["device_id"], c.stored_state(u, sent), float(max(u["num_examples"], 1)),
                          "zo" if u["kind"] == "ZO" else "lora", progress_of(u.get("stats") or {}), sent,
                          loss_of(u.get("stats") or {}))
            self.fold = fold
        return fold

    def fold_accepted(self, rnd: R.Round, device_id: str, state: dict[str, torch.Tensor], weight: int,
                      mode: str, progress: float | None, sent: dict[str, torch.Tensor],
                      loss: float | None = None) -> None:
        """Fold an accepted upload (already durable on disk; `sent`: what its device downloaded) into the
        round's streaming aggregate."""
        if self.c.defence.active:  # robust statistics need every update at once: batch at close
            return
        try:
            fold = self.fold
            if fold is None or fold.round_id != rnd.round_id:
                fold = self.round_fold(rnd)  # first upload of the round, or after a restart
            if device_id not in fold.devices:
                fold.fold(device_id, state, float(max(weight, 1)), mode, progress, sent=sent, loss=loss)
        except (ValueError, RuntimeError) as e:  # the close re-reads the round from disk
            log.warning("round %d: streaming fold of %s failed (%s); will rebuild from disk", rnd.round_id,
                        device_id, e)
            self.fold = None

    # -- closing ----------------------------------------------------------------------------
    def aggregate(self, rnd: R.Round) -> None:
        """The new global of an aggregated round, evaluated and written (raises on failure)."""
        t0 = time.perf_counter()
        if self.c.defence.active:  # clipping / robust statistics / DP over updates (coordinator.defences)
            n_uploads, metrics = self._defended(rnd)
        else:  # streaming: memory O(global state), not O(devices x adapter)
            fold = self.round_fold(rnd)
            self.c.global_state, metrics = fold.close()
            n_uploads = len(fold.devices)
            self.fold = None
        self.publish(rnd, metrics, n_uploads, t0)

    def _defended(self, rnd: R.Round) -> tuple[int, dict[str, Any]]:
        c, defence = self.c, self.c.defence
        uploads = list(self.stored_uploads(rnd.round_id))
        dls = [c.download_tensors(u["download_id"]) for u in c.store.updates(rnd.round_id)]
        c.global_state, metrics = defended_round(c.global_state, uploads, dls, c.method, defence,
                                                 seed=c.cfg.seed * 7919 + rnd.round_id)
        if defence.dp_noise > 0:
            history = c.store.get_meta("dp_history", []) + [[defence.dp_noise, defence.dp_sample_rate]]
            c.store.set_meta("dp_history", history)
            metrics.update(dp_epsilon=dp_epsilon(history, defence.dp_delta), dp_delta=defence.dp_delta)
            log.info("round %d: DP epsilon %.3f at delta %g", rnd.round_id, metrics["dp_epsilon"], defence.dp_delta)
        return len(uploads), metrics

    def publish(self, rnd: R.Round, metrics: dict[str, Any], n_uploads: int, t0: float) -> None:
        """Evaluate and durably write the new global state of `rnd`."""
        c = self.c
        c.global_round = rnd.round_id
        metrics.update({"aggregate_s": time.perf_counter() - t0, "uploads": n_uploads})
        metrics.update(self.evaluate(c.global_state))
        metrics.update(holdout_mean(c.store.updates(rnd.round_id)))  # the devices' own held-out accuracies
        self.write_global(rnd.round_id, metrics)
        log.info("round %d aggregated (%s, %d uploads)%s", rnd.round_id, c.cfg.strategy, n_uploads,
                 f": eval loss {metrics['loss']:.4f}" if "loss" in metrics else "")

    def write_global(self, round_id: int, metrics: dict[str, Any]) -> None:
        """Write the global of `round_id` (engine blob + PEFT export) and point the store at it."""
        from .model import peft_export_files

        c, store = self.c, self.c.store
        d = round_dir(store.root, round_id)
        rel = store.rel(d / "global.safetensors")
        sha = store.write_blob(rel, global_to_bytes(c.global_state))
        cfg_json, tensors = peft_export_files(c.method.deltas(c.global_state), c.global_state.extra,
                                              c.target_modules, c.cfg.model, c.cfg.task, c.method.peft,
                                              c.method.virtual_tokens, c.method.bottleneck)
        store.write_blob(store.rel(d / "peft" / "adapter_model.safetensors"),
                         wire.encode_tensors(tensors, {"format": "pt"}, packed=False))
        store.write_blob(store.rel(d / "peft" / "adapter_config.json"), cfg_json.encode())
        if self._pooling_json:  # the head reads the checkpoint's sentence vector, not transformers' pooler
            store.write_blob(store.rel(d / "peft" / "pooling.json"), self._pooling_json)
        if round_id > 0:
            store.set_round_global(round_id, rel, sha, metrics)
        else:
            store.set_meta("initial_global_sha256", sha)
        store.set_meta("global", {"round_id": round_id, "path": rel, "sha256": sha})
        if c.policy.server_opt.active:  # the server optimizer's moments belong to this global
            opt_rel = store.rel(d / "server_opt.safetensors")
            opt_sha = store.write_blob(opt_rel, wire.encode_tensors(state_to_tensors(c.opt_state), {}, packed=False))
            store.set_meta("server_opt", {"round_id": round_id, "path": opt_rel, "sha256": opt_sha})

    def evaluate(self, g: GlobalState) -> dict[str, float]:
        """Held-out metrics of base + g on --eval-data ({} when no eval data is configured)."""
        c = self.c
        if not c.cfg.eval_data:
            return {}
        if self._evaluator is None:
            from .model import Evaluator, load_eval_records
            model, tok = c.load_model()
            self._evaluator = Evaluator(model, tok, load_eval_records(c.cfg.eval_data, c.cfg.eval_limit),
                                        task=c.cfg.task)
        return self._evaluator.evaluate(c.method.deltas(g), g.extra, c.method.peft, c.method.virtual_tokens,
                                        c.method.bottleneck)


def reported(stats: dict[str, Any], key: str) -> Any:
    """`key` of what a device reported with its upload (TrainStats.extra_json), or None."""
    import json

    try:
        return json.loads(stats.get("extra_json") or "{}").get(key)
    except (ValueError, TypeError, AttributeError):
        return None


def progress_of(stats: dict[str, Any]) -> float | None:
    """The loss progress a device reported with its upload, if any."""
    try:
        v = reported(stats, "loss_progress")
        return None if v is None else float(v)
    except (ValueError, TypeError):
        return None


def loss_of(stats: dict[str, Any]) -> float | None:
    """The mean training loss a device reported with its upload (TrainStats.train_loss), if any."""
    try:
        v = stats.get("train_loss")
        return None if v is None else float(v)
    except (ValueError, TypeError, AttributeError):
        return None


def holdout_mean(updates: list[dict[str, Any]]) -> dict[str, float]:
    """{"device_holdout_accuracy": mean, "device_holdout_n": count} of the held-out accuracies the
    round's devices reported (each its own model on its own rows; personalized with feddpa), or {}."""
    accs = []
    for u in updates:
        v = reported(u.get("stats") or {}, "holdout_accuracy")
        if isinstance(v, (int, float)) and v == v:
            accs.append(float(v))
    return {"device_holdout_accuracy": sum(accs) / len(accs), "device_holdout_n": len(accs)} if accs else {}
