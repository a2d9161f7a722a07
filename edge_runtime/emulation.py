"""Enforce an emulated device's limits inside one process on a bigger machine.

- memory: the runtime's MemoryGuard enforces the budget; a cgroup v1 memory controller (where
  the machine allows one) is a hard backstop, RLIMIT_AS the fallback;
- compute: `ComputePacer` stretches measured compute time to the profile's GFLOP/s;
- network: `ShapedLink` (protos.wire.TokenBucket + latency) shapes the gRPC chunk streams;
- availability: `AvailabilityModel` decides per round whether the device is online and
  whether it drops out mid-round (seeded, reproducible).

`DeviceEmulation` (JoinConfig.emulation, set by `edge-runtime join --emulate`) brings pacing,
availability and dropout to the join loop: it wraps the production round
(`edge_runtime.device_round.DeviceRound`) in an `EmulatedRound`.
"""
from __future__ import annotations

import logging
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos import federation_pb2 as pb
from protos.wire import TokenBucket

from .device_round import DeviceRound, Fetched, Sent, Trained, round_report

log = logging.getLogger(__name__)


class ShapedLink:
    """One direction of an emulated link: a token bucket (bytes/s) plus a one-way latency paid
    at the start of each transfer (a call after `idle_s` of silence). Callable with a byte count,
    so it plugs in as a client's `throttle_up` / `throttle_down`."""

    def __init__(self, mbps: float, latency_ms: float = 0.0, idle_s: float = 0.5) -> None:
        self.bucket = TokenBucket(mbps * 1e6 / 8, burst_bytes=64 * 1024)
        self.latency_s, self.idle_s = latency_ms / 1000.0, idle_s
        self._last = -1e9
        self.transfers = 0

    def __call__(self, nbytes: int) -> None:
        now = time.monotonic()
        if now - self._last > self.idle_s:
            self.transfers += 1
            if self.latency_s > 0:
                time.sleep(self.latency_s)
        self.bucket(nbytes)
        self._last = time.monotonic()


@dataclass
class ComputePacer:
    """Emulate a slower device: after a compute phase, sleep so that its wall time matches a device
    with `device_gflops` instead of this host, whose `host_gflops` is the fp32 GFLOP/s of ONE
    thread (what one CPU-second of the device process computes).

    With `cpu_seconds` (the process CPU time of the phase) the work is measured, not its wall
    time, so emulated devices sharing a few cores are not slowed twice (once by contention, once
    by pacing): the device needs cpu_seconds * host_gflops / device_gflops seconds in all."""

    device_gflops: float
    host_gflops: float
    slept_s: float = 0.0

    @property
    def factor(self) -> float:
        """How many times slower the device is than one host thread (>= 1; faster devices run at host speed)."""
        return max(1.0, self.host_gflops / self.device_gflops)

    def target_s(self, seconds: float, cpu_seconds: float | None = None) -> float:
        """Wall time the device needs for a phase that took `seconds` here (`cpu_seconds` of CPU)."""
        work = seconds if cpu_seconds is None else cpu_seconds
        return max(seconds, work * self.factor)

    def pace(self, seconds: float, stop: Callable[[], bool] | None = None, cpu_seconds: float | None = None) -> float:
        """Sleep the extra time the device needs after a phase of `seconds` wall (`cpu_seconds` CPU).

        Returns that extra time (what the device's round really costs, for its report), even
        when `stop()` turns true first and the sleep is cut short (its round has closed)."""
        extra = self.target_s(seconds, cpu_seconds) - seconds
        end = time.monotonic() + extra
        while (left := end - time.monotonic()) > 0:
            if stop is not None and stop():
                break
            time.sleep(min(left, 0.25))
        self.slept_s += max(0.0, extra - max(0.0, end - time.monotonic()))
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


@dataclass
class DeviceEmulation:
    """An emulated device's rounds: `pace(seconds, stop=, cpu_seconds=)` -> its extra compute seconds
    (`ComputePacer.pace`); `availability(round_id)` -> (online?, drops out mid-round?)
    (`AvailabilityModel.decide`); an offline or dropped-out device stays silent (no heartbeat, no
    poll) for `offline_s`."""

    pace: Callable[..., float] | None = None
    availability: Callable[[int], tuple[bool, bool]] | None = None
    offline_s: float = 30.0

    def wrap(self, device_round: DeviceRound) -> EmulatedRound:
        return EmulatedRound(device_round, self)


class EmulatedRound:
    """A `DeviceRound` played as an emulated device: offline rounds are sat out in silence, training
    is stretched to the device's speed, and a device that drops out trains but never sends."""

    def __init__(self, device_round: DeviceRound, emulation: DeviceEmulation):
        self.round, self.emu = device_round, emulation
        self._silent_round = -1  # the round the device went silent in: not played when it comes back

    def sits_out(self, t: pb.Task) -> bool:
        return t.round_id == self._silent_round

    def play(self, t: pb.Task) -> dict[str, Any] | None:
        online, drops = self.emu.availability(t.round_id) if self.emu.availability else (True, False)
        if not online:
            log.info("round %d: device offline (emulated availability); silent for %.0fs", t.round_id,
                     self.emu.offline_s)
            self._go_silent(t)
            return None
        fetched, trained = self.round.fetch_and_train(t)
        trained.paced_s = self._pace(t, trained)
        if drops:
            return self._drop_out(t, fetched, trained)
        return self.round.send_and_report(t, fetched, trained)

    def _pace(self, t: pb.Task, trained: Trained) -> float:
        """A straggler stops emulating its slowness once the coordinator has moved past its round; it
        still reports what the round would have cost, so the coordinator can re-plan it (--replan)."""
        if self.emu.pace is None:
            return 0.0
        t0 = time.perf_counter()
        paced_s = self.emu.pace(trained.result.seconds, stop=lambda: self.round.hb.round_over(t),
                                cpu_seconds=trained.cpu_s)
        if paced_s and time.perf_counter() - t0 < paced_s - 0.5:
            log.warning("round %d closed while this device was still computing (%.0fs of %.0fs emulated); "
                        "reporting and moving on", t.round_id, time.perf_counter() - t0, paced_s)
        return paced_s

    def _drop_out(self, t: pb.Task, fetched: Fetched, trained: Trained) -> dict[str, Any]:
        self.round.hb.status = "idle"
        log.warning("round %d: device drops out before uploading (emulated dropout)", t.round_id)
        report = {**round_report(t, fetched, trained, Sent(pb.UploadReply(accepted=False), 0, 0.0)), "dropped": True}
        self.round.last_upload_s = 0.0
        self._go_silent(t)
        return report

    def _go_silent(self, t: pb.Task) -> None:
        """Emulated disconnection: no heartbeats and no calls for `offline_s`."""
        self._silent_round = t.round_id
        hb = self.round.hb
        hb.status = "offline"
        time.sleep(self.emu.offline_s)
        hb.status = "idle"


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
    The cgroup counts what a device's OOM killer counts: it charges page cache too, but reclaims
    clean file pages (a mmapped model, a file being read) before it kills, so only anonymous
    memory can end the process, as the guard (`guard.anon_bytes`) measures it.
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
