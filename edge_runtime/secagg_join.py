"""A device's secure-aggregation round over gRPC: `SecAggClient` driven through SecAggStep.

    session = SecAggSession(client, task)            # task.secagg is set: params + payload layout
    vector, weight = session.vector(adapter_state, num_examples)
    report = session.run(vector)                     # advertise -> share keys -> masked input -> unmask

Each phase sends its message once (a masked input larger than `chunk_bytes` in chunks, each
one gRPC message), then polls with an empty payload until the coordinator closes the phase
(the reply's `wait` flag). Only Shamir shares, public keys, ciphertexts and the
masked vector leave the device; the coordinator learns the sum over the round's survivors.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from protos import federation_pb2 as pb
from protos.secagg import KeyDirectory, RoutedShares, SecAggError, SecAggParams, UnmaskRequest
from protos.secagg_payload import RoundPayload, device_payload, device_zo_payload

from .secagg_client import SecAggClient

log = logging.getLogger("edge_runtime.secagg")
CHUNK_BYTES = 4 << 20  # one SecAggStep's payload; gRPC messages are capped at 8 MiB on both sides


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """peft scaling s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


class SecAggSession:
    """One device, one round: the four SecAgg phases through `FederationClient.secagg_step`."""

    def __init__(self, client: Any, task: pb.Task, *, max_wait_s: float = 900.0, chunk_bytes: int = CHUNK_BYTES):
        if not task.secagg:
            raise ValueError(f"task of round {task.round_id} is not a secure-aggregation round")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.client, self.task, self.max_wait_s, self.chunk_bytes = client, task, max_wait_s, int(chunk_bytes)
        self.params = SecAggParams.from_bytes(task.secagg_params)
        self.payload = RoundPayload.from_bytes(task.secagg_payload)
        if self.params.round_id != task.round_id or self.params.vector_len != self.payload.vector_len:
            raise SecAggError(f"task of round {task.round_id} carries inconsistent secure-aggregation parameters")
        self.sa = SecAggClient(client.device_id)
        self.bytes_sent = self.bytes_received = 0
        self.weight = 0.0

    def vector(self, state: Mapping[str, torch.Tensor], num_examples: int,
               start: Mapping[str, torch.Tensor] | None = None, loss: float | None = None) -> np.ndarray:
        """(vector_len,) float64 payload of the trained adapter at this device's rank and scale: its
        change from `start` (what it downloaded) when the round's payload asks for changes; `loss`: the
        mean training loss that the round's loss weight reads."""
        from protos.secagg_payload import device_change

        if self.payload.changes:
            if start is None:
                raise ValueError("this secure round aggregates changes: pass the downloaded adapter as start")
            state = device_change(state, start)
        t = self.task
        vec, self.weight = device_payload(state, self.payload, num_examples,
                                          lora_scale(t.lora_alpha, int(t.assigned_rank), bool(t.use_rslora)), loss)
        if num_examples > self.payload.weight_cap:
            log.warning("round %d: %d examples counted as the coordinator's cap %d", t.round_id, num_examples,
                        int(self.payload.weight_cap))
        return vec

    def zo_vector(self, pairs: Sequence[tuple[int, float]], lr: float, num_examples: int,
                  loss: float | None = None) -> np.ndarray:
        """(pool size + 1,) float64 payload of a ZO device in seed-scalar mode (`RoundPayload.zo_scalars`)."""
        vec, self.weight = device_zo_payload(pairs, lr, self.payload, num_examples, loss)
        return vec

    def _send(self, phase: int, data: bytes) -> pb.SecAggReply:
        """Send `data` in one call, or in chunks of `chunk_bytes` (resuming where the coordinator says it is)."""
        self.bytes_sent += len(data)
        if len(data) <= self.chunk_bytes:
            return self.client.secagg_step(self.task, phase, data)
        off = 0
        while True:
            part = data[off:off + self.chunk_bytes]
            reply = self.client.secagg_step(self.task, phase, part, offset=off, total_bytes=len(data))
            if reply.received_bytes >= len(data):
                return reply
            if reply.received_bytes <= off:
                raise SecAggError(f"round {self.task.round_id}: the coordinator holds {reply.received_bytes} B of a "
                                  f"{len(data)} B message after a chunk at {off}; no progress")
            off = int(reply.received_bytes)

    def _step(self, phase: int, data: bytes) -> bytes:
        reply = self._send(phase, data)
        end = time.monotonic() + self.max_wait_s
        while reply.wait:
            if time.monotonic() > end:
                raise SecAggError(f"round {self.task.round_id}: secure-aggregation phase {phase} did not close within "
                                  f"{self.max_wait_s:.0f}s")
            time.sleep(max(0.02, reply.retry_after_s))
            reply = self.client.secagg_step(self.task, phase, b"")
        self.bytes_received += len(reply.payload)
        return reply.payload

    def advertise(self) -> KeyDirectory:
        adv = self.sa.advertise_keys(self.params)
        return KeyDirectory.from_bytes(self._step(pb.SECAGG_ADVERTISE_KEYS, adv.to_bytes()))

    def share_keys(self, directory: KeyDirectory) -> RoutedShares:
        msg = self.sa.share_keys(directory)
        return RoutedShares.from_bytes(self._step(pb.SECAGG_SHARE_KEYS, msg.to_bytes()))

    def masked_input(self, routed: RoutedShares, vector: np.ndarray) -> UnmaskRequest:
        msg = self.sa.masked_input(routed, vector)
        if self.sa.clipped:
            log.warning("round %d: %d payload values clipped to +-%g", self.task.round_id, self.sa.clipped,
                        self.params.clip)
        return UnmaskRequest.from_bytes(self._step(pb.SECAGG_MASKED_INPUT, msg.to_bytes()))

    def unmask(self, request: UnmaskRequest) -> None:
        self._step(pb.SECAGG_UNMASK, self.sa.unmask(request).to_bytes())

    def run(self, vector: np.ndarray) -> dict[str, Any]:
        """All four phases; returns {bytes_sent, bytes_received, seconds, survivors, clipped, weight}."""
        t0 = time.perf_counter()
        request = self.masked_input(self.share_keys(self.advertise()), vector)
        self.unmask(request)
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "seconds": time.perf_counter() - t0, "survivors": len(request.survivors),
                "clipped": self.sa.clipped, "weight": self.weight}
