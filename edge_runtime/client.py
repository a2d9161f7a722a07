"""Device side of the federation: a gRPC client (`FederationClient`) and the join loop (`run_join`).

Loop: register -> poll GetTask -> DownloadGlobal (resumes from the bytes already received)
-> LocalTrainer.train within the plan -> UploadUpdate with a sha256 (resumes from
UploadStatus after a dropped connection) or SubmitZO in zeroth-order mode, or, when the task
says secagg, the masked update through SecAggStep (edge_runtime.secagg_join) -> repeat until
DONE. UNAVAILABLE / DEADLINE_EXCEEDED are retried with exponential backoff and jitter.
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

if TYPE_CHECKING:  # torch is imported at the first training task, not while the device waits
    import torch

log = logging.getLogger("edge_runtime.client")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


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
    # emulation hooks (edge_runtime.emulation): stretch compute time to the device's speed, and
    # decide per round (online?, drops out mid-round?)
    pace: Callable[..., float] | None = None  # pace(seconds, stop=, cpu_seconds=) -> the device's extra seconds
    availability: Callable[[int], tuple[bool, bool]] | None = None
    offline_s: float = 30.0  # an offline / dropped-out device stays silent this long (no heartbeat, no poll)
    stepdown: bool = True  # on out-of-memory, step down the plan and resume (edge_runtime.stepdown)


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
    """Bytes of process RSS the memory guard allows: the planner's effective budget (which adds
    the runtime overhead for profiles whose budget excludes it), else the profile's budget."""
    return int((plan.memory or {}).get("budget_bytes") or profile.memory_budget_bytes)


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
    task = {"kind": conf.task or "classification", "num_labels": int(conf.num_labels or 2)}
    hb = _Heartbeat(client, cfg.heartbeat_s).__enter__()  # alive while the model loads
    try:
        return _participate(client, cfg, reply, conf, plan, task, name, trainer_factory, hb)
    finally:
        hb.__exit__(None, None, None)
        client.close()


def _make_trainer(cfg: JoinConfig, conf: Any, plan: Any, task: dict,
                  trainer_factory: Callable[..., Any] | None) -> Any:
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
    trainer = None  # loaded at the first training task (_make_trainer)
    tracker = DeltaTracker()
    local_b: dict[str, torch.Tensor] = {}
    reports: list[dict[str, Any]] = []
    last_upload_s = 0.0
    done_rounds = 0
    offline_round = -1
    while cfg.max_rounds is None or done_rounds < cfg.max_rounds:
        t = client.get_task()
        if t.state == pb.Task.DONE:
            log.info("coordinator: federation finished")
            break
        if t.state != pb.Task.TRAIN or t.round_id == offline_round:
            time.sleep(min(cfg.max_poll_s, max(0.05, t.retry_after_s or 1.0)))
            continue
        online, drops = cfg.availability(t.round_id) if cfg.availability else (True, False)
        if not online:
            log.info("round %d: device offline (emulated availability); silent for %.0fs", t.round_id,
                     cfg.offline_s)
            offline_round = t.round_id
            _go_silent(hb, cfg.offline_s)
            continue
        if trainer is None:
            trainer = _make_trainer(cfg, conf, plan, task, trainer_factory)
        report = _one_round(client, trainer, t, conf.strategy, tracker, local_b, cfg, hb, last_upload_s, drops)
        if report.get("dropped"):
            offline_round = t.round_id
            _go_silent(hb, cfg.offline_s)
        last_upload_s = report.get("upload_s", 0.0)
        reports.append(report)
        done_rounds += 1
        if cfg.on_round:
            cfg.on_round(report)
        if cfg.state_dir:
            with open(Path(cfg.state_dir) / "rounds.jsonl", "a") as f:
                f.write(json.dumps(report) + "\n")
    return {"device_id": reply.device_id, "name": name, "assigned_rank": reply.assigned_rank, "mode": conf.mode,
            "strategy": conf.strategy, "rounds": reports}


def _go_silent(hb: _Heartbeat, seconds: float) -> None:
    """Emulated disconnection: no heartbeats and no calls for `seconds`."""
    hb.status = "offline"
    time.sleep(seconds)
    hb.status = "idle"


def _secagg_upload(client: FederationClient, trainer: Any, t: pb.Task, strategy: str,
                   local_b: dict[str, torch.Tensor], n_examples: int, result: Any) -> tuple[pb.UploadReply, int]:
    """Secure aggregation instead of UploadUpdate / SubmitZO: the trained adapter masked, or (a ZO device
    in a seed-scalar round) its per-seed sums of projected gradients."""
    from protos.secagg import SecAggError

    from .secagg_join import SecAggSession

    state = trainer.adapter_state()
    if strategy == "fedsa" and t.mode != "zo":  # B stays on the device; the payload holds only A and the head
        local_b.clear()
        local_b.update({k: v for k, v in state.items() if k.endswith(B_SUFFIX)})
    try:
        session = SecAggSession(client, t)
        if session.payload.zo_scalars and t.mode == "zo":
            vec = session.zo_vector(result.zo_pairs or [], float(result.zo_lr or t.lr), n_examples)
        else:
            vec = session.vector(state, n_examples)
        report = session.run(vec)
    except SecAggError as e:  # too few devices left, or a check on the coordinator's messages failed
        log.warning("round %d: secure aggregation stopped: %s", t.round_id, e)
        return pb.UploadReply(accepted=False, reason=str(e)), 0
    log.info("round %d: secure aggregation done with %d survivors (%d B sent, %d B received, %.2fs)", t.round_id,
             report["survivors"], report["bytes_sent"], report["bytes_received"], report["seconds"])
    return pb.UploadReply(accepted=True, received_bytes=report["bytes_sent"]), report["bytes_sent"]


def _one_round(client: FederationClient, trainer: Any, t: pb.Task, strategy: str, tracker: DeltaTracker,
               local_b: dict[str, torch.Tensor], cfg: JoinConfig, hb: _Heartbeat, last_upload_s: float,
               drops: bool = False) -> dict:
    import torch

    t0 = time.perf_counter()
    blob = client.download(t)
    download_s = time.perf_counter() - t0
    tensors, meta = wire.decode_tensors(blob)
    state, delta = wire.split_download(tensors)
    if trainer.rank != t.assigned_rank or trainer.lora_alpha != t.lora_alpha:
        trainer.configure(rank=int(t.assigned_rank), lora_alpha=float(t.lora_alpha), use_rslora=bool(t.use_rslora),
                          seed=int(t.seed))
    if delta:
        inc = tracker.increment(delta)
        if inc:
            trainer.merge_base_delta(inc)
    if strategy == "fedsa" and t.mode != "zo":  # B stays on the device: reuse ours (zeros at first)
        current = trainer.adapter_state()
        for k in current:
            if k.endswith(B_SUFFIX) and k not in state:
                b = local_b.get(k)
                state[k] = b if b is not None and b.shape == current[k].shape else torch.zeros_like(current[k])
    trainer.load_adapter_state(state)
    if t.secagg and t.mode == "zo":  # a seed-scalar secure round: train with the round's shared seed pool
        from protos.secagg_payload import RoundPayload

        rp = RoundPayload.from_bytes(t.secagg_payload)
        trainer.zo_pool_seed, trainer.zo_pool_size = (rp.zo_pool_seed, rp.zo_pool_size) if rp.zo_scalars else (0, None)
    hb.status = "training"
    records = cfg.records
    lr = float(t.lr) if t.lr > 0 else None
    cpu0 = time.process_time()
    result = trainer.train(records, int(t.local_steps), lr=lr, seed=int(t.seed), progress=cfg.progress)
    cpu_s = time.process_time() - cpu0  # the work done, whatever the contention for cores was
    # a straggler stops emulating its slowness once the coordinator has moved past its round; it still
    # reports what the round would have cost, so the coordinator can re-plan it (--replan)
    t_pace = time.perf_counter()
    paced_s = cfg.pace(result.seconds, stop=lambda: hb.round_over(t), cpu_seconds=cpu_s) if cfg.pace else 0.0
    if paced_s and time.perf_counter() - t_pace < paced_s - 0.5:
        log.warning("round %d closed while this device was still computing (%.0fs of %.0fs emulated); "
                    "reporting and moving on", t.round_id, time.perf_counter() - t_pace, paced_s)
    if drops:
        hb.status = "idle"
        log.warning("round %d: device drops out before uploading (emulated dropout)", t.round_id)
        return {"round_id": t.round_id, "rank": t.assigned_rank, "mode": t.mode, "train_s": result.seconds,
                "paced_s": paced_s, "train_loss": result.mean_loss, "peak_rss_bytes": result.peak_rss_bytes,
                "download_s": download_s, "download_bytes": len(blob), "upload_s": 0.0, "upload_bytes": 0,
                "accepted": False, "dropped": True}
    hb.status = "uploading"
    n_examples = int(result.examples_seen or len(records))
    stats = pb.TrainStats(num_examples=n_examples, train_loss=float(result.mean_loss),
                          train_time_s=result.seconds + paced_s,
                          peak_memory_bytes=int(result.peak_rss_bytes), upload_time_s=last_upload_s,
                          download_time_s=download_s, steps=int(result.steps),
                          extra_json=json.dumps(trainer.report()) if hasattr(trainer, "report") and trainer.report() else "")
    t1 = time.perf_counter()
    try:
        if t.secagg:
            reply, sent = _secagg_upload(client, trainer, t, strategy, local_b, n_examples, result)
        elif t.mode == "zo":
            pairs = result.zo_pairs or []
            reply = client.submit_zo(t, pairs, float(result.zo_lr or lr or 0.0), n_examples, stats)
            sent = len(pairs) * 8
        else:
            up = trainer.adapter_state()
            if strategy == "fedsa":
                local_b.clear()
                local_b.update({k: v for k, v in up.items() if k.endswith(B_SUFFIX)})
                up = {k: v for k, v in up.items() if not k.endswith(B_SUFFIX)}
            data = wire.encode_tensors(up, {"rank": t.assigned_rank, "lora_alpha": t.lora_alpha,
                                            "use_rslora": int(t.use_rslora)}, trainer.plan.upload_precision)
            sent = len(data)
            reply = client.upload(t, data, stats)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        # straggler policy: the round closed without us; pick up the next one
        log.warning("round %d: upload refused (%s); moving on to the next round", t.round_id, e.details())
        reply = pb.UploadReply(accepted=False, reason=e.details() or "")
        sent = 0
    upload_s = time.perf_counter() - t1
    hb.status = "idle"
    log.info("round %d: trained %d steps in %.1fs (loss %.4f), uploaded %d bytes in %.2fs", t.round_id,
             result.steps, result.seconds, result.mean_loss, sent, upload_s)
    return {"round_id": t.round_id, "rank": t.assigned_rank, "mode": t.mode, "train_s": result.seconds,
            "paced_s": paced_s, "train_loss": result.mean_loss, "peak_rss_bytes": result.peak_rss_bytes, "download_s": download_s,
            "download_bytes": len(blob), "upload_s": upload_s, "upload_bytes": sent, "accepted": reply.accepted,
            **({"stepdown": trainer.last_events, "plan_rank": trainer.plan.rank} if getattr(trainer, "last_events", None) else {})}
