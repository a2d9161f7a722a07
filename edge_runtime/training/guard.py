"""Memory guard: stop training cleanly before the OS kills the process for exceeding its budget.

`MemoryGuard(budget_bytes)` samples the process memory an OOM killer counts (`anon_bytes`:
anonymous + shared-memory pages; clean file pages such as a mmapped model or the page cache of
a file being read are reclaimable and not counted) from a light background thread and at every
`check()` (called once per training step). When that exceeds the budget the
guard trips: `check()` raises `MemoryBudgetExceeded`, and if the guard was started on the
main thread the sampler also interrupts it (SIGUSR1 -> the same exception) so a runaway step
stops at the next Python bytecode rather than at the next step boundary.
"""
from __future__ import annotations

import resource
import signal
import sys
import threading
from typing import Any

import psutil

MiB = 2**20


class MemoryBudgetExceeded(MemoryError):
    """RSS went above the device's memory budget; the message says what to change."""

    def __init__(self, peak_bytes: int, budget_bytes: int, result: Any = None):
        self.peak_bytes, self.budget_bytes, self.result = peak_bytes, budget_bytes, result
        super().__init__(
            f"memory budget exceeded: peak {peak_bytes / MiB:.0f} MiB > budget {budget_bytes / MiB:.0f} MiB; "
            "lower batch_size or seq_len, enable gradient_checkpointing, lower the rank or base_precision "
            "(or use mode 'zo'), or re-plan with `edge-runtime plan`; the last good adapter checkpoint was kept")


class LoadOutOfMemory(MemoryBudgetExceeded):
    """Loading the base model (and building its adapter) went above the load limit (see `load_limit_bytes`)."""

    def __init__(self, peak_bytes: int, limit_bytes: int, budget_bytes: int, what: str):
        self.peak_bytes, self.budget_bytes, self.limit_bytes, self.result = peak_bytes, budget_bytes, limit_bytes, None
        MemoryError.__init__(
            self, f"out of memory while loading {what}: RSS reached {peak_bytes / MiB:.0f} MiB, over the load limit "
            f"{limit_bytes / MiB:.0f} MiB (budget {budget_bytes / MiB:.0f} MiB x{LOAD_FACTOR} + {LOAD_SLACK // MiB} MiB "
            "for the transient load peak); re-plan with `edge-runtime plan` (it accounts for the load peak), "
            "use a smaller or pre-quantized model, or give the device more memory")


# The emulator's hard cap (cgroup / RLIMIT_AS) sits above the guard so the guard acts first; the load
# limit sits between them: a load peak the planner under-estimated by up to 25 % still passes, a
# larger one stops cleanly as LoadOutOfMemory instead of being killed by the cap.
HARD_CAP_FACTOR, HARD_CAP_SLACK = 1.3, 128 * MiB
LOAD_FACTOR, LOAD_SLACK = 1.25, 96 * MiB


def hard_cap_bytes(budget_bytes: int) -> int:
    """The emulated device's hard memory cap for a guard budget."""
    return int(budget_bytes * HARD_CAP_FACTOR) + HARD_CAP_SLACK


def load_limit_bytes(budget_bytes: int) -> int:
    """RSS the model load may reach (its peak is transient) for a guard budget; below `hard_cap_bytes`."""
    return int(budget_bytes * LOAD_FACTOR) + LOAD_SLACK


def rss_bytes() -> int:
    """Current resident set size of this process (anonymous + file-backed pages)."""
    return psutil.Process().memory_info().rss


_STATUS = "/proc/self/status"
_KILLABLE_FIELDS = ("RssAnon", "RssShmem")


def anon_bytes() -> int:
    """Memory an OOM killer counts against this process: anonymous + shared-memory resident pages
    (Linux `/proc/self/status` RssAnon + RssShmem). Clean file pages (the mapped libraries, a
    mmapped model file, the page cache of a file being read) are reclaimable and left out; where
    /proc is missing (macOS) this is the RSS."""
    try:
        total = 0
        with open(_STATUS, "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key.decode() in _KILLABLE_FIELDS:
                    total += int(value.split()[0]) * 1024
        return total
    except (OSError, ValueError, IndexError):
        return rss_bytes()


def max_rss_bytes() -> int:
    """Peak RSS of this process since it started (ru_maxrss; KiB on Linux, bytes on macOS)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(v if sys.platform == "darwin" else v * 1024)


class MemoryGuard:
    """Watch `anon_bytes()` against `budget_bytes` (None: only record the peak). Use as a context manager."""

    def __init__(self, budget_bytes: int | None, interval_s: float = 0.02, interrupt: bool = True):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"memory budget must be a positive byte count, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.interval_s = interval_s
        self.interrupt = interrupt
        self.peak_bytes = 0
        self.tripped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prev_handler: Any = None
        self._armed = False

    def sample(self) -> int:
        """Read the killable memory (`anon_bytes`), update the peak, trip when over budget; returns it."""
        rss = anon_bytes()
        self.peak_bytes = max(self.peak_bytes, rss)
        if self.budget_bytes is not None and rss > self.budget_bytes:
            self.tripped = True
        return rss

    def check(self) -> None:
        """Raise MemoryBudgetExceeded if the budget was exceeded (call once per step)."""
        self.sample()
        if self.tripped:
            raise MemoryBudgetExceeded(self.peak_bytes, int(self.budget_bytes or 0))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            raise MemoryBudgetExceeded(self.peak_bytes, int(self.budget_bytes or 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
            if self.tripped and self._armed:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    def start(self) -> "MemoryGuard":
        self.sample()
        self._stop.clear()
        on_main = threading.current_thread() is threading.main_thread()
        if self.interrupt and self.budget_bytes is not None and on_main and hasattr(signal, "pthread_kill"):
            self._prev_handler = signal.signal(signal.SIGUSR1, self._on_signal)
            self._armed = True
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._armed = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._prev_handler is not None:
            signal.signal(signal.SIGUSR1, self._prev_handler)
            self._prev_handler = None
        self.sample()

    def disarm(self) -> None:
        """Stop asynchronous interrupts (before saving a checkpoint); sampling continues."""
        self._armed = False

    def __enter__(self) -> "MemoryGuard":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
