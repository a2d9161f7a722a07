"""Device side of the federation: a gRPC client (`FederationClient`) and the join loop (`run_join`).

Loop: register -> poll GetTask -> one round (edge_runtime.device_round: DownloadGlobal, resumed
from the bytes already received -> train within the plan -> UploadUpdate with a sha256, resumed
from UploadStatus after a dropped connection, or SubmitZO in zeroth-order mode, or, when the task
says secagg, the masked update through SecAggStep) -> repeat until DONE. UNAVAILABLE /
DEADLINE_EXCEEDED are retried with exponential backoff and jitter. An emulated device
(`JoinConfig.emulation`, edge_runtime.emulation) wraps each round.
`throttle_up` / `throttle_down` (callables taking a byte count, e.g. protos.wire.TokenBucket)
shape the chunk streams for bandwidth emulation.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire

from .device_round import DeviceRound, RoundPlayer

if TYPE_CHECKING:  # torch is imported at the first training task, not while the device waits
    import torch

    from .trainer_protocol import RoundTrainer

log = logging.getLogger("edge_runtime.client")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: sleep U(0, min(max_s, base_s * 2**attempt))."""

    attempts: int = 8
    base_s: float = 0.2
    max_s: float = 10.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_s, self.base_s * 2 ** attempt))


class FederationClient:
    """One device's connection. Methods raise grpc.RpcError for non-retryable statuses."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 retry: RetryPolicy = RetryPolicy(), throttle_up: wire.Throttle | None = None,
                 throttle_down: wire.Throttle | None = None, chunk_size: int = wire.CHUNK_SIZE,
                 rpc_timeout_s: float = 120.0):
        opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20),
                # reconnect quickly after a coordinator restart (gRPC's default backoff grows to 120 s)
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]
        self.channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                        else grpc.insecure_channel(target, options=opts))
        self.stub = pbg.FederationStub(self.channel)
        self.retry, self.chunk_size, self.timeout = retry, chunk_size, rpc_timeout_s
        self.throttle_up, self.throttle_down = throttle_up, throttle_down
        self.token = ""
        self.device_id = ""
        self._rng = random.Random()
        self.on_retry: Callable[[str], None] | None = None  # e.g. edge_runtime.metrics.RuntimeMetrics.retry

    def close(self) -> None:
        self.channel.close()

    def _md(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def _retried(self, what: str) -> None:
        if self.on_retry is not None:
            self.on_retry(what)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise
                d = self.retry.delay(attempt, self._rng)
                log.warning("%s: %s (%s); retrying in %.2fs", what, e.code().name, e.details(), d)
                self._retried(what)
                time.sleep(d)
        raise AssertionError("unreachable")

    # -- calls ------------------------------------------------------------------------------
    def register(self, profile_json: str, plan_json: str, device_name: str, enrolment_token: str = "") -> pb.RegisterReply:
        req = pb.RegisterRequest(profile_json=profile_json, plan_json=plan_json, device_name=device_name,
                                 enrolment_token=enrolment_token)
        reply = self._call("Register", lambda: self.stub.Register(req, timeout=self.timeout))
        self.token, self.device_id = reply.device_token, reply.device_id
        return reply

    def get_task(self) -> pb.Task:
        req = pb.TaskRequest(device_id=self.device_id)
        return self._call("GetTask", lambda: self.stub.GetTask(req, metadata=self._md(), timeout=self.timeout))

    def heartbeat(self, status: str = "idle") -> pb.HeartbeatReply:
        req = pb.HeartbeatRequest(device_id=self.device_id, status=status)
        return self._call("Heartbeat", lambda: self.stub.Heartbeat(req, metadata=self._md(), timeout=self.timeout))

    def download(self, task: pb.Task) -> bytes:
        """The task's blob, resumed from the received bytes after a dropped stream; sha256-checked."""
        buf = bytearray()
        digest = task.download_sha256
        for attempt in range(self.retry.attempts):
            try:
                req = pb.DownloadRequest(round_id=task.round_id, download_id=task.download_id, offset=len(buf))
                for chunk in self.stub.DownloadGlobal(req, metadata=self._md(), timeout=self.timeout):
                    if chunk.offset != len(buf):
                        raise wire.WireError(f"download chunk at offset {chunk.offset}, expected {len(buf)}")
                    buf += chunk.data
                    digest = chunk.sha256 or digest
                    if self.throttle_down:
                        self.throttle_down(len(chunk.data))
                break
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise
                d = self.retry.delay(attempt, self._rng)
                log.warning("download interrupted at %d bytes (%s); resuming in %.2fs", len(buf), e.code().name, d)
                self._retried("DownloadGlobal")
                time.sleep(d)
        data = bytes(buf)
        if digest and wire.sha256_hex(data) != digest:
            raise wire.WireError(f"downloaded blob {task.download_id} fails its sha256 check; retry the round")
        return data

    def upload(self, task: pb.Task, data: bytes, stats: pb.TrainStats, upload_id: str | None = None) -> pb.UploadReply:
        """Stream `data`; after a dropped connection ask UploadStatus and send only the rest."""
        upload_id = upload_id or f"r{task.round_id}-{task.nonce[:12]}"
        header = pb.UploadHeader(round_id=task.round_id, nonce=task.nonce, total_size=len(data),
                                 sha256=wire.sha256_hex(data), kind=pb.LORA, stats=stats, upload_id=upload_id)
        start = 0
        for attempt in range(self.retry.attempts):
            try:
                it = wire.upload_chunks(header, data, start, self.chunk_size, self.throttle_up)
                return self.stub.UploadUpdate(it, metadata=self._md(), timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS and attempt > 0:
                    return pb.UploadReply(accepted=True, received_bytes=len(data), reason="accepted earlier")
                if e.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise
                d = self.retry.delay(attempt, self._rng)
                time.sleep(d)
                try:
                    st = self.stub.UploadStatus(pb.UploadStatusRequest(round_id=task.round_id, upload_id=upload_id),
                                                metadata=self._md(), timeout=self.timeout)
                    start = min(int(st.received_offset), len(data))
                except grpc.RpcError:
                    start = 0
                log.warning("upload interrupted (%s); resuming at byte %d", e.code().name, start)
                self._retried("UploadUpdate")
        raise AssertionError("unreachable")

    def submit_zo(self, task: pb.Task, pairs: Sequence[tuple[int, float]], lr: float, num_examples: int,
                  stats: pb.TrainStats) -> pb.UploadReply:
        msg = pb.ZoUpdate(round_id=task.round_id, nonce=task.nonce, seeds=[int(s) for s, _ in pairs],
                          grads=[float(g) for _, g in pairs], lr=float(lr), num_examples=num_examples, stats=stats)
        if self.throttle_up:
            self.throttle_up(msg.ByteSize())

        def send() -> pb.UploadReply:
            try:
                return self.stub.SubmitZO(msg, metadata=self._md(), timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return pb.UploadReply(accepted=True, reason="accepted earlier")
                raise
        return self._call("SubmitZO", send)

    def secagg_step(self, task: pb.Task, phase: int, payload: bytes, offset: int = 0,
                    total_bytes: int = 0) -> pb.SecAggReply:
        """One secure-aggregation call (edge_runtime.secagg_join); re-sending a message is harmless.
        `offset` / `total_bytes`: `payload` is one chunk of a larger message."""
        req = pb.SecAggRequest(round_id=task.round_id, nonce=task.nonce, phase=phase, payload=payload,
                               offset=offset, total_bytes=total_bytes)
        if self.throttle_up and payload:
            self.throttle_up(len(payload))
        return self._call("SecAggStep", lambda: self.stub.SecAggStep(req, metadata=self._md(), timeout=self.timeout))


# -- join loop ----------------------------------------------------------------------------------
@dataclass
class JoinConfig:
    target: str
    model: str
    plan: Any  # edge_runtime.plan.Plan
    profile: Any  # edge_runtime.profile.DeviceProfile
    records: list[dict[str, Any]]
    name: str = ""
    state_dir: str | None = None
    max_rounds: int | None = None
    enrolment_token: str = ""
    credentials: grpc.ChannelCredentials | None = None
    throttle_up: wire.Throttle | None = None
    throttle_down: wire.Throttle | None = None
    heartbeat_s: float = 5.0
    max_poll_s: float = 5.0
    threads: int | None = None
    progress: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_round: Callable[[dict[str, Any]], None] | None = None  # called with each round's report
    on_retry: Callable[[str], None] | None = None  # called with the call's name each time one is retried
    # edge_runtime.emulation.DeviceEmulation (--emulate): pacing, availability and dropout around each round
    emulation: Any = None
    stepdown: bool = True  # on out-of-memory, step down the plan and resume (edge_runtime.stepdown)
    # this device's own held-out rows: its model after each round's training is evaluated on them and the
    # accuracy reported ("holdout_accuracy" in TrainStats.extra_json; with a personal adapter: personalized)
    holdout: list[dict[str, Any]] = field(default_factory=list)


class _Heartbeat:
    """Background heartbeats so the coordinator does not count a training device as dropped out."""

    def __init__(self, client: FederationClient, every_s: float):
        self.client, self.every_s = client, every_s
        self.status = "idle"
        self.current_round = 0  # the newest round the coordinator has opened, from the last reply
        self.server_offset_s = 0.0  # coordinator clock - this clock, from the last reply
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.status == "offline":
                continue
            try:
                r = self.client.heartbeat(self.status)
                self.current_round = max(self.current_round, int(r.current_round))
                if r.server_time_unix:
                    self.server_offset_s = float(r.server_time_unix) - time.time()
            except grpc.RpcError as e:
                log.debug("heartbeat failed: %s", e.code().name)

    def round_over(self, t: pb.Task) -> bool:
        """True once the coordinator has opened a later round or `t`'s deadline has passed."""
        late = bool(t.deadline_unix) and time.time() + self.server_offset_s > t.deadline_unix
        return self.current_round > t.round_id or late

    def __enter__(self) -> "_Heartbeat":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


def _device_name(cfg: JoinConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.state_dir:
        p = Path(cfg.state_dir) / "device.json"
        if p.exists():
            return json.loads(p.read_text())["name"]
    return f"{cfg.profile.name}-{uuid.uuid4().hex[:8]}"


class DeltaTracker:
    """stack: the coordinator sends the cumulative base delta; merge only what is new.

    merged[module] = (B (out, R), A (R, in)) already added to the base weights.
    """

    def __init__(self) -> None:
        self.merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def increment(self, delta: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple]:
        import torch

        out = {}
        for name, (B, A) in delta.items():
            if name in self.merged:
                Bo, Ao = self.merged[name]
                if Bo.shape == B.shape and torch.equal(Bo, B) and torch.equal(Ao, A):
                    continue
                B_inc, A_inc = torch.cat([B, -Bo], dim=1), torch.cat([A, Ao], dim=0)  # new - old, as factors
            else:
                B_inc, A_inc = B, A
            out[name] = (A_inc, B_inc, 1.0)
            self.merged[name] = (B.clone(), A.clone())
        return out


def guard_budget(plan: Any, profile: Any) -> int:
    """Killable bytes (`guard.anon_bytes`) the memory guard allows: the planner's effective budget (which adds
    the runtime overhead for profiles whose budget excludes it), else the profile's budget."""
    return int((plan.memory or {}).get("budget_bytes") or profile.memory_budget_bytes)


def task_from_config(conf: pb.TrainingConfig) -> dict[str, Any]:
    """The task the coordinator set (Register's TrainingConfig) as LocalTrainer's task dict."""
    return {"kind": conf.task or "classification", "num_labels": int(conf.num_labels or 2),
            "label_words": list(conf.label_words)}


def run_join(cfg: JoinConfig, trainer_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Participate until the coordinator says DONE (or max_rounds). Returns a summary dict."""
    from dataclasses import replace

    client = FederationClient(cfg.target, cfg.credentials, cfg.retry, cfg.throttle_up, cfg.throttle_down)
    client.on_retry = cfg.on_retry
    name = _device_name(cfg)
    reply = client.register(json.dumps(cfg.profile.to_dict()), cfg.plan.to_json(), name, cfg.enrolment_token)
    conf = reply.config
    if cfg.state_dir:
        sd = Path(cfg.state_dir)
        sd.mkdir(parents=True, exist_ok=True)
        (sd / "device.json").write_text(json.dumps({"name": name, "device_id": reply.device_id}))
    log.info("registered as %s (%s): rank %d, strategy %s, mode %s", reply.device_id, name, reply.assigned_rank,
             conf.strategy, conf.mode)
    plan = replace(cfg.plan, target_modules=list(conf.target_modules) or cfg.plan.target_modules,
                   mode=conf.mode or cfg.plan.mode, lora_alpha=float(reply.lora_alpha) or cfg.plan.lora_alpha,
                   use_rslora=bool(reply.use_rslora))
    task = task_from_config(conf)
    hb = _Heartbeat(client, cfg.heartbeat_s).__enter__()  # alive while the model loads
    try:
        return _participate(client, cfg, reply, conf, plan, task, name, trainer_factory, hb)
    finally:
        hb.__exit__(None, None, None)
        client.close()


def _make_trainer(cfg: JoinConfig, conf: Any, plan: Any, task: dict,
                  trainer_factory: Callable[..., Any] | None) -> RoundTrainer:
    """The round trainer (LocalTrainer unless a factory is given), wrapped for OOM step-down.

    Built at the first training task, so a registered device that is waiting has not imported
    torch / transformers / peft nor loaded the model (docs/footprint.md)."""
    if trainer_factory is None:
        from edge_runtime.training.session import LocalTrainer as trainer_factory  # noqa: N813
    trainer = trainer_factory(cfg.model, plan, task, memory_budget_bytes=guard_budget(cfg.plan, cfg.profile),
                              seed=int(conf.seed), threads=cfg.threads)
    if cfg.stepdown:
        from edge_runtime.stepdown import adaptive_for_join
        trainer = adaptive_for_join(trainer, cfg, task, trainer_factory)
    return trainer


def _participate(client: FederationClient, cfg: JoinConfig, reply: Any, conf: Any, plan: Any, task: dict,
                 name: str, trainer_factory: Callable[..., Any] | None, hb: _Heartbeat) -> dict[str, Any]:
    rnd = DeviceRound(client, cfg, hb, DeltaTracker(), lambda: _make_trainer(cfg, conf, plan, task, trainer_factory))
    player: RoundPlayer = cfg.emulation.wrap(rnd) if cfg.emulation is not None else rnd
    reports: list[dict[str, Any]] = []
    while cfg.max_rounds is None or len(reports) < cfg.max_rounds:
        t = client.get_task()
        if t.state == pb.Task.DONE:
            log.info("coordinator: federation finished")
            break
        if t.state != pb.Task.TRAIN or player.sits_out(t):
            time.sleep(min(cfg.max_poll_s, max(0.05, t.retry_after_s or 1.0)))
            continue
        report = player.play(t)
        if report is None:  # the device did not take part (an emulated offline round)
            continue
        reports.append(report)
        if cfg.on_round:
            cfg.on_round(report)
        if cfg.state_dir:
            with open(Path(cfg.state_dir) / "rounds.jsonl", "a") as f:
                f.write(json.dumps(report) + "\n")
    return {"device_id": reply.device_id, "name": name, "assigned_rank": reply.assigned_rank, "mode": conf.mode,
            "strategy": conf.strategy, "rounds": reports}
