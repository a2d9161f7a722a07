"""In-process federation for the benchmarks: the coordinator's `RoundEngine` and the device's own
download/upload contract (`protos.adapter`), with real wire bytes, in one process.

Each round every device: downloads `engine.download(...)` as wire bytes, decodes them, merges a
base delta if the method sends one, loads its adapter (`prepare_download`: what it keeps
locally), trains with its `LocalTrainer`, splits its upload (`split_upload`) and sends it as wire
bytes at its upload precision (ZO: seeds and scalars, replayed by the engine). The engine
validates and folds each upload and closes the round: the same code path as `edge-coordinator`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from coordinator.engine import RoundEngine
from coordinator.round_policy import RoundPolicy
from coordinator.rounds import cohort
from coordinator.server_opt import ServerOptState
from edge_runtime.client import DeltaTracker
from edge_runtime.device_round import obey_peft
from edge_runtime.training.prune import prune_trainer
from edge_runtime.training.personal import personal_ratio, split_personal, with_personal
from protos import federation_pb2 as pb
from protos import wire
from protos.adapter import DeviceContract, State, TrainingRecipe, loss_progress, prepare_download, split_upload


@dataclass
class SimDevice:
    """One emulated device: its rank/mode, data, local recipe, and what it keeps between rounds."""

    name: str
    rank: int
    mode: str  # "lora" | "zo"
    records: list[dict[str, Any]]
    steps: int
    lr: float
    upload_precision: str = "fp32"
    plan: Any = None  # the device's edge_runtime Plan, when the caller keeps one
    kept: State = field(default_factory=dict)  # tensors the contract keeps on the device
    server_kept: State = field(default_factory=dict)  # what the coordinator keeps for it


@dataclass
class RoundTraffic:
    bytes_up: int = 0
    bytes_down: int = 0
    train_losses: list[float] = field(default_factory=list)
    pruned: dict[str, int] = field(default_factory=dict)  # device -> rank it pruned to (rank self-pruning)
    personal_acc: dict[str, float] = field(default_factory=dict)  # device -> its own model's held-out accuracy

    def add(self, other: RoundTraffic) -> None:
        """Fold another round's traffic into this one (a pass of several cohort rounds)."""
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.train_losses += other.train_losses
        self.pruned.update(other.pruned)
        self.personal_acc.update(other.personal_acc)


def run_pass(method: Any, g: Any, pass_id: int, devices: Sequence[SimDevice], trainer_for: Callable[[SimDevice], Any],
             tracker_for: Callable[[Any], DeltaTracker], seed: int, policy: RoundPolicy, opt_state: ServerOptState,
             holdouts: Mapping[str, list[dict[str, Any]]] | None = None) -> tuple[Any, RoundTraffic]:
    """Pass `pass_id` (1-based) over `devices`: `policy.cohorts` rounds, each training its cohort
    (`coordinator.rounds.cohort`, as the coordinator selects) from the previous round's global. Returns
    (the global after the pass, the pass's traffic)."""
    total, k = RoundTraffic(), policy.cohorts
    for i in range(k):
        rid = (pass_id - 1) * k + i + 1
        names = set(cohort([d.name for d in devices], k, seed, rid))  # k = 1: every device
        engine = RoundEngine(method, g, rid, policy=policy, opt_state=opt_state)
        total.add(run_round(engine, [d for d in devices if d.name in names], trainer_for, tracker_for, seed + rid,
                            holdouts=holdouts))
        g, _ = engine.close()
    return g, total


def run_round(engine: RoundEngine, devices: Sequence[SimDevice], trainer_for: Callable[[SimDevice], Any],
              tracker_for: Callable[[Any], DeltaTracker], seed: int, train_kw: Mapping[str, Any] | None = None,
              holdouts: Mapping[str, list[dict[str, Any]]] | None = None) -> RoundTraffic:
    """Train and fold every device into `engine` (then call `engine.close()`). holdouts: device ->
    its own held-out rows, on which its model after local training is evaluated (personalized LoRA)."""
    traffic = RoundTraffic()
    for i, d in enumerate(devices):
        sent = engine.download(d.rank, d.mode, seed, d.server_kept)
        blob = engine.blob(sent, d.rank, d.mode)
        traffic.bytes_down += len(blob)
        tensors, meta = wire.decode_tensors(blob)
        contract = DeviceContract.from_meta(meta)
        state, delta = wire.split_download(tensors)
        trainer = trainer_for(d)
        cfg, L = engine.method.cfg, contract.personal_rank
        if L and trainer.plan.rank < d.rank + L:  # the personal adapter's slots (edge_runtime.device_round)
            trainer.plan = replace(trainer.plan, rank=d.rank + L)
        obey_peft(trainer, contract)  # the PEFT type the method's devices train (LoRA, prompt, (IA)3, BitFit)
        trainer.configure(d.rank + L, cfg.lora_alpha, cfg.use_rslora, seed)
        if delta:
            inc = tracker_for(trainer).increment(delta)
            if inc:
                trainer.merge_base_delta(inc)
        trainer.attach_sparse(contract.sparse_seed, contract.sparse_density)  # SLoRA's sparse delta (0: none)
        state = prepare_download(state, trainer.adapter_state(), d.kept, contract)
        if L:
            state = with_personal(state, trainer.adapter_state(), d.kept, d.rank,
                                  personal_ratio(cfg.lora_alpha, d.rank, L, cfg.use_rslora))
        trainer.load_adapter_state(state)
        trainer.recipe = TrainingRecipe.from_meta(meta)
        trainer.frozen = contract.frozen
        res = trainer.train(d.records, d.steps, lr=d.lr, seed=seed * 1000 + i, progress=False, **(train_kw or {}))
        traffic.train_losses.append(float(res.mean_loss))
        if d.mode == "zo":
            msg = pb.ZoUpdate(round_id=engine.round_id, nonce="x" * 32, seeds=[s for s, _ in res.zo_pairs],
                              grads=[g for _, g in res.zo_pairs], lr=float(res.zo_lr), num_examples=len(d.records))
            traffic.bytes_up += msg.ByteSize()
            final = engine.replay_zo(sent, res.zo_pairs, float(res.zo_lr))
        else:
            new = prune_trainer(trainer, contract.prune_threshold)
            if new is not None:  # it uploads at, and trains from the next round at, the pruned rank
                d.rank = traffic.pruned[d.name] = new
            trained, mine = trainer.adapter_state(), {}
            if L:
                ratio = personal_ratio(cfg.lora_alpha, d.rank, L, cfg.use_rslora)
                trained, mine = split_personal(trained, d.rank, ratio)
            if holdouts and d.name in holdouts:
                traffic.personal_acc[d.name] = float(trainer.evaluate(holdouts[d.name])["accuracy"])
            up, d.kept = split_upload(trained, contract)
            d.kept.update(mine)
            data = wire.encode_tensors(up, {"rank": d.rank}, d.upload_precision)
            traffic.bytes_up += len(data)
            final, _ = wire.decode_tensors(data)
        engine.accept(d.name, final, float(len(d.records)), sent, d.mode, progress=loss_progress(res.losses),
                      loss=float(res.mean_loss))
        d.server_kept = engine.kept_from(final, d.mode)
    return traffic


def device_view_deltas(engine_method: Any, g: Any, devices: Sequence[SimDevice]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the model adds to W for evaluation: the method's global deltas, or (a method whose B
    stays on the devices) the global A with the devices' mean kept B, zero-padded to max rank."""
    deltas = engine_method.deltas(g)
    if deltas or not any(d.kept for d in devices):
        return deltas
    out = {}
    s = engine_method.cfg.scale(engine_method.cfg.max_rank)
    for name, u in g.modules.items():
        B = torch.zeros(u.shape[0], u.rank, dtype=torch.float64)
        n = 0
        for d in devices:
            b = d.kept.get(name + ".lora_B.weight")
            if b is not None:
                B[:, : b.shape[1]] += b.double() * engine_method.cfg.scale(b.shape[1]) / s
                n += 1
        out[name] = ((B / max(n, 1)).float() * s, u.A)
    return out


def global_accuracy(engine: RoundEngine, d: SimDevice, trainer: Any, holdout: list[dict[str, Any]]) -> float:
    """Accuracy of `engine`'s global (what a device of d's rank downloads, no personal adapter) on
    `holdout`, with `trainer` (a method without a base delta)."""
    state, _ = wire.split_download(engine.download(d.rank, "lora", 0))
    cfg = engine.method.cfg
    trainer.configure(d.rank, cfg.lora_alpha, cfg.use_rslora)
    trainer.load_adapter_state(state)
    return float(trainer.evaluate(holdout)["accuracy"])


def personal_holdouts(devices: Sequence[SimDevice], seed: int, frac: float = 0.2) -> dict[str, list[dict[str, Any]]]:
    """Hold out `frac` of every device's rows (shuffled under `seed`; they train on the rest): device -> its split."""
    import random

    out = {}
    for d in devices:
        rows = list(d.records)
        random.Random(seed).shuffle(rows)
        cut = max(1, int(len(rows) * frac))
        out[d.name], d.records = rows[:cut], rows[cut:]
    return out
