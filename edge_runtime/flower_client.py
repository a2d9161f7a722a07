"""The device runtime as a Flower client (optional: needs `flwr`).

`DeviceRuntime` is the device: it loads its `DeviceProfile`, plans under it
(`edge_runtime.planner.plan`) before any training, and trains with `LocalTrainer` at the
rank the server assigns (never above the plan's). `FlowerDeviceClient` is the thin
`flwr.client.NumPyClient` around it, and `client_fn` / `make_client_app` build a Flower
`ClientApp` from a SuperNode's node config:

    flower-supernode ... --node-config 'model="/models/minilm" profile="profiles/jetson-nano-4gb.yaml"
                                        data="/data/mine.jsonl"'

Wire conventions (`protos.flower_pack`): arrays in sorted key order, keys as JSON in the
config / metrics; ZO devices return [seeds, projected gradients] and the learning rate.
The server's config carries the method's `protos.adapter.DeviceContract` (`CFG_CONTRACT`), which
the device obeys through the gRPC device's own stages (`edge_runtime.device_round`: load, prune,
upload_state): the PEFT type (prompt tuning, (IA)3, BitFit), a personal adapter (FedDPA: its slots
never leave the device), rank self-pruning (HetLoRA: the upload's rank is the pruned one), SLoRA's
sparse stage, and the tensors it keeps on the device (e.g. FedSA-LoRA's B), reused at the next
download. The runtime (loaded model, merged stack deltas) is cached per node in this process;
the kept tensors are also stored in the node's Flower `Context.state`, so they survive a
ClientApp process restart.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from flwr.client import ClientApp, NumPyClient

from edge_runtime import device_round
from edge_runtime.client import DeltaTracker
from edge_runtime.device_round import Fetched
from edge_runtime.data import load_records
from edge_runtime.modelspec import load_model_spec
from edge_runtime.plan import Plan
from edge_runtime.planner import plan as make_plan
from edge_runtime.profile import DeviceProfile, load_profile
from protos.task import label_words_from_json
from protos import flower_pack as P
from protos import federation_pb2 as pb
from protos.adapter import CONTRACT_META, RECIPE_META, DeviceContract, loss_progress
from protos.wire import split_download

log = logging.getLogger("edge_runtime.flower")
KEPT_LOCAL = "kept_local"  # Context.state key of the tensors the device contract keeps on the device


def contract_of(config: Mapping[str, Any]) -> DeviceContract:
    """The device contract the server put in a round's config (none: load and send everything)."""
    return DeviceContract.from_meta({CONTRACT_META: str(config.get(P.CFG_CONTRACT) or "")})


def task_of(config: Mapping[str, Any]) -> pb.Task:
    """A Flower round's config as the gRPC `Task` the device round's stages read (rank, alpha, rsLoRA,
    seed, mode, steps, lr, round), so both transports load and upload through the same code."""
    return pb.Task(round_id=int(config.get(P.CFG_ROUND, 0)), assigned_rank=int(config[P.CFG_RANK]),
                   local_steps=int(config.get(P.CFG_STEPS, 0)), lr=float(config.get(P.CFG_LR, 0.0)),
                   seed=int(config.get(P.CFG_SEED, 0)), mode=str(config[P.CFG_MODE]),
                   lora_alpha=float(config[P.CFG_ALPHA]), use_rslora=bool(config[P.CFG_RSLORA]))


@dataclass
class DeviceSettings:
    """One device. plan: skip the planner and use this plan. max_rank: an operator cap on the plan's rank.

    enforce_budget: run the MemoryGuard at the profile's budget (turn off when several emulated
    devices share one process, where RSS is the whole process's).
    overhead_bytes: runtime overhead for planning (None: measured once, cached).
    """

    model: str
    profile: DeviceProfile
    records: list[dict[str, Any]]
    task: str = "classification"
    eval_records: list[dict[str, Any]] | None = None
    plan: Plan | None = None
    max_rank: int | None = None
    enforce_budget: bool = True
    overhead_bytes: int | None = None
    threads: int | None = None
    progress: bool = False
    local_steps: int | None = None  # what the planner assumes for the round deadline (None: its default)

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError(f"device {self.profile.name}: no training records; give it a non-empty data file")
        if self.max_rank is not None and int(self.max_rank) < 1:
            raise ValueError(f"max_rank={self.max_rank!r}: expected an integer >= 1")


class DeviceRuntime:
    """Plans at construction; trains / evaluates Flower rounds. Not thread-safe per instance (one node, one job)."""

    def __init__(self, settings: DeviceSettings):
        self.settings = settings
        self.profile = settings.profile
        self.overhead = settings.overhead_bytes
        self.plan = settings.plan or self._plan()
        if settings.max_rank is not None and self.plan.rank > settings.max_rank:
            self.plan = replace(self.plan, rank=int(settings.max_rank),
                                reasons=self.plan.reasons + [f"rank capped at {settings.max_rank} by the operator"])
        self.trainer: Any = None
        self.tracker = DeltaTracker()
        self.kept: dict[str, torch.Tensor] = {}  # what the device contract keeps on the device
        self.lock = threading.Lock()
        log.info("%s: plan %s rank %d (%s, batch %d, seq %d)", self.profile.name, self.plan.mode, self.plan.rank,
                 self.plan.base_precision, self.plan.batch_size, self.plan.seq_len)

    def _plan(self) -> Plan:
        s = self.settings
        spec = load_model_spec(s.model)
        return make_plan(self.profile, spec, s.task, data_examples=len(s.records), overhead_bytes=s.overhead_bytes,
                         round_deadline_s=self.profile.round_deadline_s, local_steps=s.local_steps or 20)

    def properties(self) -> dict[str, Any]:
        return {P.PROP_RANK: int(self.plan.rank), P.PROP_MODE: self.plan.mode, P.PROP_PROFILE: self.profile.name,
                P.PROP_BUDGET: int(self.profile.memory_budget_bytes), "plan_json": self.plan.to_json(indent=None)}

    # -- adapter from a download ---------------------------------------------------------
    def _budget(self) -> int | None:
        if not self.settings.enforce_budget:
            return None
        extra = 0
        if self.profile.budget_excludes_runtime:
            extra = self.overhead if self.overhead is not None else runtime_overhead_here()
        return int(self.profile.memory_budget_bytes + extra)

    def _trainer_for(self, config: Mapping[str, Any]) -> Any:
        """The LocalTrainer for the server's mode and targets, built on first use (its rank, PEFT type and
        personal slots are set by `edge_runtime.device_round.load`, as for a gRPC device)."""
        mode, rank = str(config[P.CFG_MODE]), int(config[P.CFG_RANK])
        alpha, rslora = float(config[P.CFG_ALPHA]), bool(config[P.CFG_RSLORA])
        targets = json.loads(config[P.CFG_TARGETS]) if config.get(P.CFG_TARGETS) else []
        targets = list(targets) or list(self.plan.target_modules)  # a non-LoRA PEFT type's global names none
        if rank > self.plan.rank:
            raise ValueError(f"server assigned rank {rank} above this device's plan rank {self.plan.rank}")
        plan = replace(self.plan, mode=mode, target_modules=targets, lora_alpha=alpha, use_rslora=rslora)
        t = self.trainer
        if t is None or t.plan.mode != mode or list(t.plan.target_modules) != targets:
            from edge_runtime.stepdown import adaptive_for_join
            from edge_runtime.training.session import LocalTrainer

            task = {"kind": str(config.get(P.CFG_TASK, self.settings.task)),
                    "num_labels": int(config.get(P.CFG_LABELS, 2)),
                    "label_words": label_words_from_json(str(config.get(P.CFG_LABEL_WORDS, "")))}
            inner = LocalTrainer(self.settings.model, plan, task, memory_budget_bytes=self._budget(),
                                 seed=int(config.get(P.CFG_SEED, 0)), threads=self.settings.threads)
            t = adaptive_for_join(inner, self.settings, task, LocalTrainer)  # OOM step-down, as `join`
            self.trainer, self.tracker = t, DeltaTracker()
        if t.use_rslora != rslora:
            t.configure(rank=rank, lora_alpha=alpha, use_rslora=rslora, seed=int(config.get(P.CFG_SEED, 0)))
        return t

    def load(self, arrays: Sequence[np.ndarray], config: Mapping[str, Any],
             kept: dict[str, torch.Tensor]) -> tuple[Any, Fetched, pb.Task]:
        """Configure the trainer and load the download as a gRPC device does (`device_round.load`: the
        contract's PEFT type, personal adapter, SLoRA sparse stage, kept tensors; stack: the new base
        delta merged first). Returns (trainer, the decoded download, the round as a Task)."""
        from protos.adapter import TrainingRecipe

        state, delta = split_download(P.arrays_to_state(arrays, config[P.KEYS]))
        t = self._trainer_for(config)
        fetched = Fetched(state, delta, contract_of(config), 0, 0.0,
                          TrainingRecipe.from_meta({RECIPE_META: str(config.get(P.CFG_RECIPE) or "")}))
        task = task_of(config)
        device_round.load(t, task, fetched, self.tracker, kept)
        return t, fetched, task

    # -- rounds --------------------------------------------------------------------------
    def fit(self, arrays: Sequence[np.ndarray], config: Mapping[str, Any],
            kept: dict[str, torch.Tensor]) -> tuple[list[np.ndarray], int, dict[str, Any], dict[str, torch.Tensor]]:
        """(arrays, num_examples, metrics, tensors to keep on the device: `kept` as the round left it)."""
        with self.lock:
            t, fetched, task = self.load(arrays, config, kept)
            steps, lr = int(config.get(P.CFG_STEPS, self.plan.local_steps)), float(config.get(P.CFG_LR, 0.0)) or None
            result = t.train(self.settings.records, steps, lr=lr, seed=int(task.seed), progress=self.settings.progress)
            n = int(result.examples_seen or len(self.settings.records))
            metrics = self._fit_metrics(t, task, fetched, result)
            if task.mode == "zo":
                out, keys = P.zo_to_arrays(result.zo_pairs or [])
                metrics[P.ZO_LR] = float(result.zo_lr or lr or t.plan.learning_rate)
            else:
                up = device_round.upload_state(t, fetched.contract, kept)  # personal slots stay in `kept`
                out, keys = P.state_to_arrays(up, self.plan.upload_precision)
            metrics[P.KEYS] = keys
            return out, n, metrics, kept

    def _fit_metrics(self, t: Any, task: pb.Task, fetched: Fetched, result: Any) -> dict[str, Any]:
        """A fit's metrics; rank self-pruning (the contract's threshold) happens here, before the upload."""
        pruned = device_round.prune(t, task, fetched)  # {"pruned_rank": r', "plan": ...} or {}
        metrics: dict[str, Any] = {P.CFG_MODE: task.mode, "train_s": float(result.seconds), "steps": int(result.steps),
                                   "peak_rss_bytes": int(result.peak_rss_bytes), P.PROP_PROFILE: self.profile.name,
                                   "rank": int(t.rank) - fetched.contract.personal_rank}  # the uploaded rank
        if "pruned_rank" in pruned:
            metrics["pruned_rank"] = int(pruned["pruned_rank"])
        if fetched.contract.personal_rank and self.settings.eval_records:  # global + personal on its held-out rows
            metrics.update(device_round.holdout_accuracy(t, task, self.settings.eval_records))
        if math.isfinite(result.mean_loss):
            metrics["train_loss"] = float(result.mean_loss)
        metrics["loss_progress"] = loss_progress(list(result.losses or []))
        if getattr(t, "last_events", None):
            metrics["stepdown"] = json.dumps(t.last_events)
        return metrics

    def evaluate(self, arrays: Sequence[np.ndarray], config: Mapping[str, Any],
                 kept: Mapping[str, torch.Tensor]) -> tuple[float, int, dict[str, Any]]:
        """Score the downloaded global at this device's rank (with its personal adapter, if the contract
        has one); the device's own adapter is put back afterwards."""
        records = self.settings.eval_records or self.settings.records
        with self.lock:
            prev = self.trainer.adapter_state() if self.trainer is not None else None
            t = self.load(arrays, config, dict(kept))[0]  # a personal adapter's slots included
            m = t.evaluate(records)
            cur = t.adapter_state()
            if prev is not None and {k: v.shape for k, v in prev.items()} == {k: v.shape for k, v in cur.items()}:
                t.load_adapter_state(prev)
        metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and k != "loss"}
        return float(m["loss"]), len(records), metrics


def runtime_overhead_here() -> int:
    """The runtime a "budget excludes the runtime" profile sits on top of, in this process: the larger of
    a fresh torch + transformers + peft interpreter (measured once, cached) and this process's killable
    memory with those imported (a Flower ClientApp process also holds flwr's client stack), both counted
    as the MemoryGuard counts (`guard.anon_bytes`), so the guard's limit is the budget above the runtime."""
    import peft  # noqa: F401 - the trainer imports both anyway
    import transformers  # noqa: F401

    from edge_runtime.measure import measure_runtime_overhead
    from edge_runtime.training.guard import anon_bytes
    return max(measure_runtime_overhead(), anon_bytes())


class FlowerDeviceClient(NumPyClient):
    """NumPyClient over a DeviceRuntime; `state` is the node's Flower Context.state (the kept tensors live there)."""

    def __init__(self, runtime: DeviceRuntime, state: Any = None):
        self.runtime = runtime
        self.node_state = state

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.runtime.properties()

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        t = self.runtime.trainer
        return P.state_to_arrays(t.adapter_state())[0] if t is not None else []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        out, n, metrics, keep = self.runtime.fit(parameters, config, dict(self._kept()))
        if keep:
            self._store_kept(keep)
        return out, n, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        return self.runtime.evaluate(parameters, config, self._kept())

    def _kept(self) -> dict[str, torch.Tensor]:
        if self.node_state is not None and KEPT_LOCAL in self.node_state:
            return {k: v.float() for k, v in self.node_state[KEPT_LOCAL].to_torch_state_dict().items()}
        return dict(self.runtime.kept)

    def _store_kept(self, kept: Mapping[str, torch.Tensor]) -> None:
        self.runtime.kept = {k: v.clone() for k, v in kept.items()}
        if self.node_state is not None:
            from flwr.app import ArrayRecord
            self.node_state[KEPT_LOCAL] = ArrayRecord({k: v.contiguous() for k, v in kept.items()})


# -- ClientApp ---------------------------------------------------------------------------------
_RUNTIMES: dict[tuple, DeviceRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()


def settings_from_node_config(node_config: Mapping[str, Any]) -> DeviceSettings:
    """DeviceSettings from a SuperNode's node config.

    Keys: model (HF dir), profile (YAML path), data (JSONL/CSV/TSV path), optional eval-data,
    task, max-rank, threads, enforce-budget (default true), plan (a plan JSON to use instead of
    planning here), local-steps (what the planner assumes for the profile's round deadline).
    """
    missing = [k for k in ("model", "profile", "data") if k not in node_config]
    if missing:
        raise ValueError(f"node config lacks {missing}; start the SuperNode with --node-config "
                         "'model=\"DIR\" profile=\"P.yaml\" data=\"D.jsonl\"'")
    ev, plan_path = node_config.get("eval-data"), node_config.get("plan")
    return DeviceSettings(plan=Plan.load(str(plan_path)) if plan_path else None,
                          local_steps=int(node_config["local-steps"]) if "local-steps" in node_config else None,
                          model=str(node_config["model"]), profile=load_profile(str(node_config["profile"])),
                          records=load_records(str(node_config["data"])),
                          eval_records=load_records(str(ev)) if ev else None,
                          task=str(node_config.get("task", "classification")),
                          max_rank=int(node_config["max-rank"]) if "max-rank" in node_config else None,
                          threads=int(node_config["threads"]) if "threads" in node_config else None,
                          enforce_budget=bool(node_config.get("enforce-budget", True)))


def runtime_for(node_id: int, key: tuple, build: Any) -> DeviceRuntime:
    """The cached DeviceRuntime of (node, settings key), built with `build()` on first use."""
    with _RUNTIMES_LOCK:
        rt = _RUNTIMES.get((node_id, key))
        if rt is None:
            rt = _RUNTIMES[(node_id, key)] = build()
        return rt


def client_fn(context: Any) -> Any:
    """Flower client_fn: one FlowerDeviceClient per message, over the node's cached runtime."""
    nc = dict(context.node_config)
    key = tuple(sorted((k, str(v)) for k, v in nc.items()))
    rt = runtime_for(int(context.node_id), key, lambda: DeviceRuntime(settings_from_node_config(nc)))
    return FlowerDeviceClient(rt, context.state).to_client()


def make_client_app() -> ClientApp:
    """The ClientApp `flwr run` / a SuperNode loads (`edge_runtime.flower_client:app`)."""
    return ClientApp(client_fn=client_fn)


app = make_client_app()


def cached_runtimes() -> dict[int, DeviceRuntime]:
    """Node id -> its cached runtime (the latest settings per node), for inspection."""
    with _RUNTIMES_LOCK:
        return {node: rt for (node, _), rt in _RUNTIMES.items()}


def clear_runtimes() -> None:
    """Forget the cached runtimes (tests, or to free memory between simulated federations)."""
    with _RUNTIMES_LOCK:
        _RUNTIMES.clear()


__all__ = ["DeviceSettings", "DeviceRuntime", "FlowerDeviceClient", "client_fn", "make_client_app", "app",
           "settings_from_node_config", "cached_runtimes", "clear_runtimes"]
