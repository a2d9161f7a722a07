"""Shared helpers of the security / reliability / fuzz tests (no tests here).

A `SimDevice` is a real gRPC client (edge_runtime.client.FederationClient) that skips
training: its "update" is the downloaded adapter plus a seeded perturbation, so hundreds of
them fit on two cores.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from edge_runtime.client import FederationClient, RetryPolicy
from protos import federation_pb2 as pb
from protos import wire
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONWARNINGS": "ignore"}


def tiny_model(tmp: Path) -> Path:
    from edge_runtime.training.tiny import make_tiny_bert

    return make_tiny_bert(tmp / "bert", hidden=32, vocab_size=300)


def plan_json(rank: int = 4, mode: str = "lora") -> str:
    return json.dumps({"rank": rank, "mode": mode})


class SimDevice:
    """Register / poll / download / upload over real gRPC, without training."""

    def __init__(self, target: str, name: str, rank: int = 4, credentials=None, enrolment_token: str = "",
                 retry: RetryPolicy = RetryPolicy(attempts=3, base_s=0.05, max_s=0.5)):
        self.client = FederationClient(target, credentials, retry=retry, rpc_timeout_s=60)
        self.name, self.rank, self.token = name, rank, enrolment_token

    def register(self) -> pb.RegisterReply:
        return self.client.register("{}", plan_json(self.rank), self.name, self.token)

    def wait_task(self, timeout_s: float = 30.0) -> pb.Task:
        return wait_until(lambda: (t := self.client.get_task()).state == pb.Task.TRAIN and t, timeout=timeout_s,
                          interval=0.05, what=f"{self.name}: a TRAIN task")

    def download_state(self, t: pb.Task) -> dict[str, torch.Tensor]:
        """The downloaded adapter (stack's cumulative base delta left out: it is not uploaded)."""
        return {k: v for k, v in wire.decode_tensors(self.client.download(t))[0].items()
                if not k.startswith("base_delta.")}

    def update_bytes(self, state: dict[str, torch.Tensor], seed: int, step: float = 0.01,
                     direction: dict[str, torch.Tensor] | None = None, factor: float = 1.0,
                     noise: float = 1.0) -> bytes:
        """Encode state + step * (direction + noise * N(0, 1)); `factor` then scales the change (attacks)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in state.items():
            change = step * ((direction or {}).get(k, torch.zeros_like(v)) + noise * torch.randn(v.shape, generator=g))
            out[k] = v + factor * change
        return wire.encode_tensors(out)

    def upload(self, t: pb.Task, data: bytes, num_examples: int = 10) -> pb.UploadReply:
        return self.client.upload(t, data, pb.TrainStats(num_examples=num_examples))

    def close(self) -> None:
        self.client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_serve(args: list[str], log: Path, timeout_s: float = 90.0) -> tuple[subprocess.Popen, int]:
    """`python -m coordinator.cli serve ARGS` with output in `log`; waits for its 'listening on port N'."""
    start = log.stat().st_size if log.exists() else 0
    f = open(log, "a")
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", *args], cwd=ROOT, env=ENV,
                            stdout=f, stderr=subprocess.STDOUT)

    def listening() -> re.Match | None:
        m = re.search(r"listening on port (\d+)", log.read_text()[start:])
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        return None

    try:
        m = wait_until(listening, timeout=timeout_s, interval=0.1, what="the coordinator's 'listening on port N'",
                       diagnose=lambda: log.read_text()[-3000:])
    except AssertionError:
        proc.kill()
        raise
    return proc, int(m.group(1))


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20
