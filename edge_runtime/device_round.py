"""One federated round on the device, as a pipeline of short stages:

    fetch (download + decode) -> load (rank, stack base delta, device contract) -> train
    -> send (UploadUpdate / SubmitZO / secure aggregation) -> report

`DeviceRound` holds what lasts across rounds (the client, the heartbeat, the stack-delta tracker,
the tensors the download's `protos.adapter.DeviceContract` keeps on the device, and the trainer,
built at the first task) and plays one `pb.Task` with `play`. Nothing here depends on the
method's name: what a device keeps, loads and sends comes from the contract. Emulated devices
(pacing, availability, dropout) wrap a DeviceRound: `edge_runtime.emulation.EmulatedRound`.
torch is imported at the first round, not while the device waits (docs/footprint.md).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from protos import federation_pb2 as pb
from protos import wire

if TYPE_CHECKING:
    import torch

    from edge_runtime.client import DeltaTracker, FederationClient, JoinConfig, _Heartbeat
    from edge_runtime.trainer_protocol import RoundTrainer, TrainOutcome
    from protos.adapter import DeviceContract, TrainingRecipe

log = logging.getLogger("edge_runtime.client")  # the join loop's logger: one stream per device


@dataclass
class Fetched:
    """A decoded download: adapter tensors, the stack base delta (module -> (B, A); {} otherwise),
    the device contract from its metadata, its size and how long it took."""

    state: dict[str, torch.Tensor]
    delta: dict[str, tuple]
    contract: DeviceContract
    nbytes: int
    seconds: float
    recipe: TrainingRecipe | None = None  # the round's FedProx / logit adjustment / lr factor


@dataclass
class Trained:
    """A local run: the trainer's result, its process CPU seconds, and the extra seconds an emulated
    slower device took on top (edge_runtime.emulation; 0 on a real device)."""

    result: TrainOutcome
    cpu_s: float
    paced_s: float = 0.0


@dataclass
class Sent:
    """What the coordinator answered, the bytes sent and how long sending took."""

    reply: pb.UploadReply
    nbytes: int
    seconds: float


class RoundPlayer(Protocol):
    """What the join loop drives: `DeviceRound`, or a wrapper around one (edge_runtime.emulation)."""

    def sits_out(self, t: pb.Task) -> bool:
        """True: poll again later instead of playing `t`."""

    def play(self, t: pb.Task) -> dict[str, Any] | None:
        """The round's report (None: the device did not take part)."""


# -- stages ---------------------------------------------------------------------------------------
def fetch(client: FederationClient, t: pb.Task) -> Fetched:
    from protos.adapter import DeviceContract, TrainingRecipe

    t0 = time.perf_counter()
    blob = client.download(t)
    seconds = time.perf_counter() - t0
    tensors, meta = wire.decode_tensors(blob)
    state, delta = wire.split_download(tensors)
    return Fetched(state, delta, DeviceContract.from_meta(meta), len(blob), seconds, TrainingRecipe.from_meta(meta))


def load(trainer: RoundTrainer, t: pb.Task, fetched: Fetched, tracker: DeltaTracker,
         kept: dict[str, torch.Tensor]) -> None:
    """Configure the adapter as the task says, merge what is new in the base delta, and load the
    download, completed by the tensors the contract keeps on the device (`kept`; zeros at first)."""
    from protos.adapter import prepare_download

    personal = fetched.contract.personal_rank  # a personal adapter's slots after the global's
    if personal:
        _fit_rank(trainer, int(t.assigned_rank) + personal)
    if (obey_peft(trainer, fetched.contract) or trainer.rank != t.assigned_rank + personal
            or trainer.lora_alpha != t.lora_alpha):
        trainer.configure(rank=int(t.assigned_rank) + personal, lora_alpha=float(t.lora_alpha),
                          use_rslora=bool(t.use_rslora), seed=int(t.seed))
    if fetched.delta:
        inc = tracker.increment(fetched.delta)
        if inc:
            trainer.merge_base_delta(inc)
    _attach_sparse(trainer, fetched.contract)
    state = fetched.state
    if fetched.contract.keep_local:
        state = prepare_download(state, trainer.adapter_state(), kept, fetched.contract)
    if personal:
        from edge_runtime.training.personal import with_personal

        state = with_personal(state, trainer.adapter_state(), kept, int(t.assigned_rank), _ratio(trainer, personal))
    trainer.load_adapter_state(state)
    if fetched.recipe is not None:
        trainer.recipe = fetched.recipe
    trainer.frozen = fetched.contract.frozen
    if t.secagg and t.mode == "zo":  # a seed-scalar secure round: train with the round's shared seed pool
        from protos.secagg_payload import RoundPayload

        rp = RoundPayload.from_bytes(t.secagg_payload)
        trainer.zo_pool_seed, trainer.zo_pool_size = (rp.zo_pool_seed, rp.zo_pool_size) if rp.zo_scalars else (0, None)


def _attach_sparse(trainer: RoundTrainer, contract: DeviceContract) -> None:
    """SLoRA's sparse delta as the contract says (none: removed); a trainer without one refuses a sparse stage."""
    attach = getattr(trainer, "attach_sparse", None)  # optional member (edge_runtime.trainer_protocol)
    if attach is not None:
        attach(contract.sparse_seed, contract.sparse_density)
    elif contract.sparse_density:
        raise ValueError(f"the download's contract asks for a sparse delta (SLoRA, density {contract.sparse_density}); "
                         f"this trainer ({type(trainer).__name__}) has none: join with the torch trainer")


def _fit_rank(trainer: RoundTrainer, rank: int) -> None:
    """Raise the plan's rank to `rank` when a personal adapter needs more slots than it has (LoRA
    factors are a small part of a plan's memory; the plan is not re-estimated)."""
    from dataclasses import replace

    for t in (trainer, getattr(trainer, "inner", None)):
        if t is not None and t.plan.rank < rank:
            t.plan = replace(t.plan, rank=rank)


def obey_peft(trainer: RoundTrainer, contract: DeviceContract) -> bool:
    """Set the trainer's plan to the PEFT type the contract names (prompt tuning, (IA)3, BitFit, bottleneck
    adapters or LoRA; every device of a federation trains the same one, at the contract's prompt length /
    bottleneck width when it names one). True: it changed (reconfigure)."""
    from dataclasses import replace

    changed = False
    for t in (trainer, getattr(trainer, "inner", None)):
        if t is None:
            continue
        want = {"peft": contract.peft, "virtual_tokens": contract.virtual_tokens or t.plan.virtual_tokens,
                "bottleneck": contract.bottleneck or t.plan.bottleneck}
        if any(getattr(t.plan, k) != v for k, v in want.items()):
            t.plan = replace(t.plan, **want)
            changed = True
    return changed or getattr(trainer, "peft", contract.peft) != contract.peft


def _task_lr(t: pb.Task) -> float | None:
    return float(t.lr) if t.lr > 0 else None


def train(trainer: RoundTrainer, t: pb.Task, records: list[dict[str, Any]], progress: bool) -> Trained:
    cpu0 = time.process_time()
    result = trainer.train(records, int(t.local_steps), lr=_task_lr(t), seed=int(t.seed), progress=progress)
    return Trained(result, time.process_time() - cpu0)  # CPU: the work done, whatever the contention for cores


def prune(trainer: RoundTrainer, t: pb.Task, fetched: Fetched) -> dict[str, Any]:
    """Rank self-pruning when the download's contract asks for it (not in secure or ZO rounds, whose
    uploads have the served shape): what to report ({} when nothing was pruned)."""
    threshold = fetched.contract.prune_threshold
    if not threshold or t.secagg or t.mode == "zo":
        return {}
    from edge_runtime.training.prune import prune_trainer

    new = prune_trainer(trainer, threshold)
    if new is None:
        return {}
    return {"pruned_rank": new, "plan": {**trainer.plan.to_dict(), "rank": new}}


def holdout_accuracy(trainer: RoundTrainer, t: pb.Task, holdout: list[dict[str, Any]]) -> dict[str, Any]:
    """{"holdout_accuracy": ...} of the device's model after training (global part + a personal
    adapter, if any) on its own held-out rows; {} without rows or for a ZO device."""
    if not holdout or t.mode == "zo":
        return {}
    return {"holdout_accuracy": float(trainer.evaluate(holdout)["accuracy"])}


def train_stats(trainer: RoundTrainer, fetched: Fetched, trained: Trained, num_records: int,
                last_upload_s: float, pruned: dict[str, Any] | None = None) -> pb.TrainStats:
    """The round's TrainStats; `pruned`: what the device adds to extra_json (pruned rank, held-out accuracy)."""
    from protos.adapter import loss_progress

    r = trained.result
    extra = {**trainer.report(), **(pruned or {}), "loss_progress": loss_progress(list(r.losses or []))}
    return pb.TrainStats(num_examples=int(r.examples_seen or num_records), train_loss=float(r.mean_loss),
                         train_time_s=r.seconds + trained.paced_s, peak_memory_bytes=int(r.peak_rss_bytes),
                         upload_time_s=last_upload_s, download_time_s=fetched.seconds, steps=int(r.steps),
                         extra_json=json.dumps(extra) if extra else "")


def _ratio(trainer: RoundTrainer, personal: int) -> float:
    """s_r / s_{r+L} of this trainer (its rank is global + personal slots)."""
    from edge_runtime.training.personal import personal_ratio

    return personal_ratio(trainer.lora_alpha, trainer.rank - personal, personal, trainer.use_rslora)


def upload_state(trainer: RoundTrainer, contract: DeviceContract,
                 kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained adapter to send; the tensors the contract keeps on the device replace `kept`
    (a personal adapter's slots stay on the device too)."""
    from protos.adapter import split_upload

    state = trainer.adapter_state()
    if contract.personal_rank:
        from edge_runtime.training.personal import split_personal

        state, mine = split_personal(state, trainer.rank - contract.personal_rank,
                                     _ratio(trainer, contract.personal_rank))
        kept.update(mine)
    up, keep = split_upload(state, contract)
    if contract.keep_local:
        for k in [k for k in kept if k in state]:  # the contract's tensors (a personal adapter's stay)
            del kept[k]
        kept.update(keep)
    return up


def _secagg_send(client: FederationClient, t: pb.Task, up: dict[str, torch.Tensor], result: TrainOutcome,
                 n_examples: int, start: dict[str, torch.Tensor]) -> tuple[pb.UploadReply, int]:
    """Secure aggregation instead of UploadUpdate / SubmitZO: the trained adapter masked, or (a ZO device
    in a seed-scalar round) its per-seed sums of projected gradients."""
    from protos.secagg import SecAggError

    from .secagg_join import SecAggSession

    try:
        session = SecAggSession(client, t)
        if session.payload.zo_scalars and t.mode == "zo":
            vec = session.zo_vector(result.zo_pairs or [], float(result.zo_lr or t.lr), n_examples,
                                    float(result.mean_loss))
        else:
            vec = session.vector(up, n_examples, start, float(result.mean_loss))
        report = session.run(vec)
    except SecAggError as e:  # too few devices left, or a check on the coordinator's messages failed
        log.warning("round %d: secure aggregation stopped: %s", t.round_id, e)
        return pb.UploadReply(accepted=False, reason=str(e)), 0
    log.info("round %d: secure aggregation done with %d survivors (%d B sent, %d B received, %.2fs)", t.round_id,
             report["survivors"], report["bytes_sent"], report["bytes_received"], report["seconds"])
    return pb.UploadReply(accepted=True, received_bytes=report["bytes_sent"]), report["bytes_sent"]


def _deliver(client: FederationClient, trainer: RoundTrainer, t: pb.Task, result: TrainOutcome,
             stats: pb.TrainStats, fetched: Fetched, kept: dict[str, torch.Tensor]) -> tuple[pb.UploadReply, int]:
    if t.secagg:
        return _secagg_send(client, t, upload_state(trainer, fetched.contract, kept), result, stats.num_examples,
                            fetched.state)
    if t.mode == "zo":
        pairs = result.zo_pairs or []
        lr = float(result.zo_lr or _task_lr(t) or 0.0)
        return client.submit_zo(t, pairs, lr, stats.num_examples, stats), len(pairs) * 8
    up = upload_state(trainer, fetched.contract, kept)
    rank = trainer.rank - fetched.contract.personal_rank  # what it sends: the global adapter's rank
    data = wire.encode_tensors(up, {"rank": rank, "lora_alpha": t.lora_alpha, "use_rslora": int(t.use_rslora)},
                               trainer.plan.upload_precision)
    return client.upload(t, data, stats), len(data)


def send(client: FederationClient, trainer: RoundTrainer, t: pb.Task, trained: Trained, stats: pb.TrainStats,
         fetched: Fetched, kept: dict[str, torch.Tensor]) -> Sent:
    t1 = time.perf_counter()
    try:
        reply, nbytes = _deliver(client, trainer, t, trained.result, stats, fetched, kept)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        # straggler policy: the round closed without us; pick up the next one
        log.warning("round %d: upload refused (%s); moving on to the next round", t.round_id, e.details())
        reply, nbytes = pb.UploadReply(accepted=False, reason=e.details() or ""), 0
    return Sent(reply, nbytes, time.perf_counter() - t1)


def round_report(t: pb.Task, fetched: Fetched, trained: Trained, sent: Sent) -> dict[str, Any]:
    r = trained.result
    return {"round_id": t.round_id, "rank": t.assigned_rank, "mode": t.mode, "train_s": r.seconds,
            "paced_s": trained.paced_s, "train_loss": r.mean_loss, "peak_rss_bytes": r.peak_rss_bytes,
            "download_s": fetched.seconds, "download_bytes": fetched.nbytes, "upload_s": sent.seconds,
            "upload_bytes": sent.nbytes, "accepted": sent.reply.accepted}


def report(trainer: RoundTrainer, t: pb.Task, fetched: Fetched, trained: Trained, sent: Sent) -> dict[str, Any]:
    """`round_report` plus, after an out-of-memory step-down, what changed and the new plan's rank."""
    out = round_report(t, fetched, trained, sent)
    if trainer.rank != t.assigned_rank + fetched.contract.personal_rank:  # pruned: the rank it uploaded, trains next
        out["pruned_rank"] = trainer.rank
    if trainer.last_events:
        out.update(stepdown=trainer.last_events, plan_rank=trainer.plan.rank)
    return out


# -- the round ------------------------------------------------------------------------------------
class DeviceRound:
    """The production round (a `RoundPlayer`): fetch -> load -> train, then send -> report."""

    def __init__(self, client: FederationClient, cfg: JoinConfig, hb: _Heartbeat, tracker: DeltaTracker,
                 make_trainer: Callable[[], RoundTrainer]):
        self.client, self.cfg, self.hb, self.tracker = client, cfg, hb, tracker
        self._make_trainer = make_trainer
        self._trainer: RoundTrainer | None = None
        self.kept: dict[str, torch.Tensor] = {}  # what the device contract keeps on the device
        self.last_upload_s = 0.0  # reported in the next round's TrainStats

    @property
    def trainer(self) -> RoundTrainer:
        """Built at the first training task (the model is not loaded while the device waits)."""
        if self._trainer is None:
            self._trainer = self._make_trainer()
        return self._trainer

    def sits_out(self, t: pb.Task) -> bool:
        return False

    def play(self, t: pb.Task) -> dict[str, Any]:
        fetched, trained = self.fetch_and_train(t)
        return self.send_and_report(t, fetched, trained)

    def fetch_and_train(self, t: pb.Task) -> tuple[Fetched, Trained]:
        trainer = self.trainer
        fetched = fetch(self.client, t)
        load(trainer, t, fetched, self.tracker, self.kept)
        self.hb.status = "training"
        return fetched, train(trainer, t, self.cfg.records, self.cfg.progress)

    def send_and_report(self, t: pb.Task, fetched: Fetched, trained: Trained) -> dict[str, Any]:
        self.hb.status = "uploading"
        extra = {**prune(self.trainer, t, fetched), **holdout_accuracy(self.trainer, t, self.cfg.holdout)}
        stats = train_stats(self.trainer, fetched, trained, len(self.cfg.records), self.last_upload_s, extra)
        sent = send(self.client, self.trainer, t, trained, stats, fetched, self.kept)
        self.last_upload_s = sent.seconds
        self.hb.status = "idle"
        r = trained.result
        log.info("round %d: trained %d steps in %.1fs (loss %.4f), uploaded %d bytes in %.2fs", t.round_id,
                 r.steps, r.seconds, r.mean_loss, sent.nbytes, sent.seconds)
        return report(self.trainer, t, fetched, trained, sent)
