"""Event-based waiting for tests (no tests here): wait for the condition, not for a fixed time.

    value = wait_until(lambda: store.rounds()[0]["state"] == "closed", timeout=30, what="round 1 closed")

`wait_until` polls `predicate` until it returns a truthy value, and returns that value. On timeout
it fails the test (AssertionError) with `what`, the time waited and, if given, `diagnose()` (called
once, at failure: e.g. the tail of a log). Exceptions raised by the predicate propagate unless their
type is in `ignore` (e.g. ConnectionError while a server is still starting).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, *, what: str = "", interval: float = 0.02,
               diagnose: Callable[[], object] | None = None,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `predicate` until truthy (returns its value); AssertionError after `timeout` seconds."""
    start = time.monotonic()
    deadline = start + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as e:  # noqa: PERF203 - polling loop
            last_exc = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    msg = f"timed out after {time.monotonic() - start:.1f}s waiting for {what or getattr(predicate, '__name__', 'condition')}"
    if last_exc is not None:
        msg += f" (last error: {last_exc!r})"
    if diagnose is not None:
        msg += f"\n{diagnose()}"
    raise AssertionError(msg)


def run_devices(server, jobs: list[tuple[Callable[..., object], tuple]], timeout: float = 55.0) -> None:
    """Run each (device function, args) in its own thread, join them (`timeout` each), then stop
    the gRPC `server` whatever happened (the caller asserts on what the devices returned)."""
    import threading

    threads = [threading.Thread(target=fn, args=args) for fn, args in jobs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)
    finally:
        server.stop(0)


def join_device(port: int, model: str, plan: object, name: str, records: list[dict],
                trainer_factory: Callable[..., object] | None = None, **join_kw: object) -> dict:
    """One emulated device (4 GiB, 2 GiB budget, 10 GFLOP/s fp32) that joins the coordinator on
    127.0.0.1:`port` until the federation ends; returns `edge_runtime.client.run_join`'s summary."""
    from edge_runtime.client import JoinConfig, run_join
    from edge_runtime.profile import DeviceProfile

    prof = DeviceProfile(name=name, memory_total_bytes=4 << 30, memory_budget_bytes=2 << 30,
                         compute_gflops={"fp32": 10.0})
    cfg = JoinConfig(target=f"127.0.0.1:{port}", model=model, plan=plan, profile=prof, records=records, name=name,
                     heartbeat_s=1.0, max_poll_s=0.3, **join_kw)
    return run_join(cfg, trainer_factory)
