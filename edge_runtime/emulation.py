"""Enforce an emulated device's limits inside one process on a bigger machine.

- memory: the runtime's MemoryGuard enforces the budget; a cgroup v1 memory controller (where
  the machine allows one) is a hard backstop, RLIMIT_AS the fallback;
- compute: `ComputePacer` stretches measured compute time to the profile's GFLOP/s;
- network: `TokenBucket` shapes bytes on the gRPC chunk streams, plus per-call latency;
- availability: `AvailabilityModel` decides per round whether the device is online and
  whether it drops out mid-round (seeded, reproducible).
"""
from __future__ import annotations

import logging
import os
import random
import resource
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class TokenBucket:
    """Token bucket: `rate` bytes/s sustained, `burst` bytes of credit. Thread-safe."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None, latency_s: float = 0.0) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"token bucket rate must be > 0 bytes/s, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else max(64 * 1024, self.rate / 10))
        self.latency_s = float(latency_s)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.bytes_total = 0
        self.waited_s = 0.0

    @classmethod
    def from_mbps(cls, mbps: float, latency_ms: float = 0.0) -> "TokenBucket":
        return cls(mbps * 1e6 / 8, latency_s=latency_ms / 1000)

    def consume(self, n: int) -> float:
        """Block until `n` bytes may pass; returns the seconds waited."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.bytes_total += n
            self.waited_s += wait
        if wait > 0:
            time.sleep(wait)
        return wait

    def call_latency(self) -> None:
        """One-way latency of a call (sleep)."""
        if self.latency_s > 0:
            time.sleep(self.latency_s)

    def shape(self, items: Iterable[T], size_of=lambda m: m.ByteSize()) -> Iterator[T]:
        """Yield `items` (e.g. gRPC chunk messages) at the bucket's rate."""
        for item in items:
            self.consume(int(size_of(item)))
            yield item


@dataclass
class ComputePacer:
    """Emulate a slower device: after `seconds` of real compute, sleep so that the elapsed time
    matches a device with `device_gflops` instead of this host's `host_gflops`."""

    device_gflops: float
    host_gflops: float
    slept_s: float = 0.0

    @property
    def factor(self) -> float:
        """How many times slower the device is than this host (>= 1; faster devices run at host speed)."""
        return max(1.0, self.host_gflops / self.device_gflops)

    def pace(self, seconds: float) -> float:
        extra = seconds * (self.factor - 1.0)
        if extra > 0:
            time.sleep(extra)
            self.slept_s += extra
        return extra


@dataclass
class AvailabilityModel:
    """Per round: online with probability `availability`; an online device drops out
    mid-round (after training, before upload) with probability `dropout`."""

    availability: float
    dropout: float
    seed: int = 0

    def decide(self, round_id: int) -> tuple[bool, bool]:
        rng = random.Random(f"{self.seed}:{round_id}")
        online = rng.random() < self.availability
        drops = online and rng.random() < self.dropout
        return online, drops


def _own_memory_cgroup() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                p = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                return p if p.is_dir() else None
    except OSError:
        return None
    return None


def apply_memory_cap(limit_bytes: int, name: str) -> str:
    """Hard memory cap for this process: a nested cgroup v1 memory controller where writable,
    else RLIMIT_AS (address space, so it is given headroom for torch's virtual reservations).
    Returns a description of what was applied."""
    parent = _own_memory_cgroup()
    if parent is not None:
        cg = parent / f"edgefed-{name}-{os.getpid()}"
        try:
            cg.mkdir(exist_ok=True)
            (cg / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            return f"cgroup v1 {cg} limit {limit_bytes / 2**20:.0f} MiB"
        except OSError as e:
            log.info("cgroup memory cap unavailable (%s); falling back to RLIMIT_AS", e)
    headroom = 3 * 2**30  # torch+transformers reserve ~1-2 GiB of address space they never touch
    limit = int(limit_bytes + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return f"RLIMIT_AS {limit / 2**20:.0f} MiB (budget + {headroom / 2**30:.0f} GiB address-space headroom)"


def remove_empty_cgroups(prefix: str = "edgefed-") -> int:
    """Remove the (now empty) cgroups that `apply_memory_cap` created for exited processes."""
    parent = _own_memory_cgroup()
    removed = 0
    if parent is None:
        return 0
    for cg in parent.glob(f"{prefix}*"):
        try:
            cg.rmdir()
            removed += 1
        except OSError:
            pass
    return removed
