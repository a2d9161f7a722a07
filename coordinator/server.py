"""Thin gRPC servicer: proto <-> domain calls on a Coordinator, domain errors -> status codes.

Every refusal is a coordinator.errors.CoordinatorError carrying its gRPC status name (`code`)
and its counted `reason`: unknown device / token -> UNAUTHENTICATED; revoked -> PERMISSION_DENIED;
wrong or closed round, stale nonce, not selected -> FAILED_PRECONDITION; malformed upload
(shapes, non-finite, checksum, norm) -> INVALID_ARGUMENT; oversize -> RESOURCE_EXHAUSTED;
duplicate upload -> ALREADY_EXISTS; a SecAggStep the secure-aggregation protocol refuses (phase
closed, device left out, inconsistent message) -> FAILED_PRECONDITION. Any other ValueError is
INVALID_ARGUMENT ("malformed").
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire

from .errors import CoordinatorError
from .service import Coordinator
from .validation import reason_of

log = logging.getLogger("coordinator.server")
_STATES = {"WAIT": pb.Task.WAIT, "TRAIN": pb.Task.TRAIN, "DONE": pb.Task.DONE}
MAX_MESSAGE = 8 << 20


def _code(e: Exception) -> grpc.StatusCode:
    """The gRPC status of a refusal: a CoordinatorError's own `code`, INVALID_ARGUMENT for a ValueError."""
    name = e.code if isinstance(e, CoordinatorError) else "INVALID_ARGUMENT"
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INVALID_ARGUMENT)


def _stats(msg: pb.TrainStats) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class FederationServicer(pbg.FederationServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def _auth(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata() or ())
        auth = md.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        return self.c.authenticate(token)

    def _guard(self, context: grpc.ServicerContext, fn, *args):
        try:
            return fn(*args)
        except (CoordinatorError, ValueError) as e:  # a refusal (wire.WireError is a ValueError too)
            self.c.metrics.rpc_error(fn, e)  # counts refused updates by reason
            self.c.record_rejection(reason_of(e), str(e), getattr(fn, "__name__", ""))  # durable, per reason
            context.abort(_code(e), str(e))
        except (OSError, RuntimeError, KeyError, TypeError) as e:  # a bug or a disk problem: keep serving
            log.exception("%s failed", getattr(fn, "__name__", "call"))
            self.c.record_rejection("other", f"{type(e).__name__}: {e}", getattr(fn, "__name__", ""))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the request may be retried")

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, msg: str):
        """Abort a malformed stream, counting it like the domain errors."""
        self.c.record_rejection(reason, msg, "UploadUpdate")
        context.abort(code, msg)

    def Register(self, request, context):
        r = self._guard(context, self.c.register, request.profile_json, request.plan_json, request.enrolment_token,
                        request.device_name)
        c = self.c.cfg
        cfg = pb.TrainingConfig(local_steps=c.local_steps, lr=c.lr, seed=c.seed, strategy=c.strategy,
                                target_modules=self.c.target_modules, task=c.task, num_labels=c.num_labels,
                                mode=r["mode"], label_words=list(c.label_words))
        return pb.RegisterReply(device_id=r["device_id"], device_token=r["device_token"],
                                assigned_rank=r["assigned_rank"], lora_alpha=c.lora_alpha, use_rslora=c.use_rslora,
                                config=cfg, total_rounds=c.rounds)

    def GetTask(self, request, context):
        dev = self._guard(context, self._auth, context)
        t = self._guard(context, self.c.get_task, dev)
        t = dict(t)
        t["state"] = _STATES[t["state"]]
        return pb.Task(lora_alpha=self.c.cfg.lora_alpha, use_rslora=self.c.cfg.use_rslora, **t)

    def DownloadGlobal(self, request, context):
        dev = self._guard(context, self._auth, context)
        data = self._guard(context, self.c.download, dev, request.round_id, request.download_id)
        if request.offset > len(data):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({len(data)} bytes)")
        for chunk in wire.download_chunks(data, start=request.offset):
            self.c.metrics.downloaded(len(chunk.data))
            yield chunk

    def UploadUpdate(self, request_iterator, context):
        dev = self._guard(context, self._auth, context)
        header = None
        wire_bytes = 0
        received = 0
        for chunk in request_iterator:
            wire_bytes += chunk.ByteSize()
            if chunk.HasField("header"):
                header = chunk.header
                if not header.upload_id:
                    self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "upload header needs an upload_id")
                if header.kind != pb.LORA:
                    self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                                 "UploadUpdate takes LORA updates; use SubmitZO")
                self._guard(context, self.c.upload_precheck, dev, header.round_id, header.nonce, _stats(header.stats))
            if header is None:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                             "the first UploadChunk must carry the header")
            if chunk.data:
                received = self._guard(context, self.c.upload_append, dev, header.upload_id, chunk.offset,
                                       chunk.data, header.total_size)
        if header is None:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "empty upload stream")
        h = {"round_id": header.round_id, "nonce": header.nonce, "total_size": header.total_size,
             "sha256": header.sha256, "upload_id": header.upload_id, "stats": _stats(header.stats)}
        size = self._guard(context, self.c.finish_upload, dev, h, wire_bytes)
        return pb.UploadReply(accepted=True, received_bytes=size or received)

    def UploadStatus(self, request, context):
        dev = self._guard(context, self._auth, context)
        off = self._guard(context, self.c.upload_status, dev, request.upload_id)
        return pb.UploadStatusReply(received_offset=off)

    def Heartbeat(self, request, context):
        dev = self._guard(context, self._auth, context)
        r = self.c.heartbeat(dev)
        return pb.HeartbeatReply(**r)

    def SubmitZO(self, request, context):
        dev = self._guard(context, self._auth, context)
        size = self._guard(context, self.c.submit_zo, dev, request.round_id, request.nonce, list(request.seeds),
                           list(request.grads), request.lr, request.num_examples, _stats(request.stats),
                           request.ByteSize())
        return pb.UploadReply(accepted=True, received_bytes=size)

    def SecAggStep(self, request, context):
        dev = self._guard(context, self._auth, context)
        r = self._guard(context, self.c.secagg_step, dev, request.round_id, request.nonce, int(request.phase),
                        request.payload, int(request.offset), int(request.total_bytes))
        return pb.SecAggReply(**r)


def create_server(address: str, coordinator: Coordinator, *, credentials: grpc.ServerCredentials | None = None,
                  max_workers: int = 16, tick_interval_s: float = 0.5) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server bound to `address` ('127.0.0.1:0' picks a port).

    A daemon thread ticks the coordinator (deadlines, dropouts) every `tick_interval_s` once
    the server is started; it stops with the server.
    """
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=opts)
    pbg.add_FederationServicer_to_server(FederationServicer(coordinator), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(tick_interval_s):
            try:
                coordinator.tick()
            except Exception:  # noqa: BLE001 - keep ticking; the error is logged
                log.exception("coordinator tick failed")

    orig_start, orig_stop = server.start, server.stop

    def start() -> None:
        orig_start()
        threading.Thread(target=ticker, name="coordinator-tick", daemon=True).start()

    def stop_(grace=None):
        stop.set()
        return orig_stop(grace)

    server.start, server.stop = start, stop_
    return server, port


def serve(address: str, coordinator: Coordinator, credentials: grpc.ServerCredentials | None = None,
          until_done: bool = True) -> None:
    """Run until the federation finishes (or forever with until_done=False / until Ctrl-C)."""
    server, port = create_server(address, coordinator, credentials=credentials)
    server.start()
    log.info("coordinator listening on port %d (strategy %s, %d rounds)", port, coordinator.cfg.strategy,
             coordinator.cfg.rounds)
    try:
        while True:
            if until_done and coordinator.fed.done:
                log.info("all %d rounds aggregated; shutting down in 5s", coordinator.cfg.rounds)
                server.wait_for_termination(timeout=5.0)  # lets devices poll DONE
                break
            server.wait_for_termination(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=2.0)
        coordinator.close()
