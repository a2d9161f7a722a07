"""Prometheus metrics of one Coordinator, in a registry of its own (several per process are fine).

Two sources, so the round logic needs no metric calls:
- read at scrape time from the durable store and the in-memory federation: rounds completed
  and failed, round durations, devices registered/active, accepted updates, bytes uploaded,
  aggregation time, the last held-out loss/accuracy. These survive a coordinator restart.
- live counters the gRPC servicer bumps (`rpc_error`, `downloaded`): rejected updates by
  reason and bytes streamed down. These start at zero with the process.

Names are prefixed `edgefed_`; see docs/operations.md for the list and example alerts.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import rounds as R
from .validation import REASONS, reason_of

if TYPE_CHECKING:  # the service imports this module; avoid the cycle at run time
    from .service import Coordinator

log = logging.getLogger("coordinator.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Coordinator methods whose domain errors are refused updates (the servicer reports them here).
UPLOAD_CALLS = frozenset({"upload_precheck", "upload_append", "finish_upload", "submit_zo"})
REJECT_REASONS = REASONS  # one label set for the Prometheus counter, the durable log and the dashboard


def reject_reason(exc: BaseException) -> str:
    """A short, bounded label for why an update was refused (one of REJECT_REASONS)."""
    return reason_of(exc)


def histogram_buckets(values: Iterable[float], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets [(le, count), ..., ("+Inf", n)] of `values`."""
    vals = sorted(values)
    out, i = [], 0
    for b in bounds:
        while i < len(vals) and vals[i] <= b:
            i += 1
        out.append((repr(float(b)), float(i)))
    out.append(("+Inf", float(len(vals))))
    return out


def last_eval(rounds: list[dict[str, Any]], initial: dict[str, Any] | None) -> tuple[int, dict[str, float]]:
    """(round id, metrics) of the newest aggregated round with eval metrics, else (0, initial)."""
    for r in reversed(rounds):
        m = r.get("metrics") or {}
        if r["state"] == R.AGGREGATED and ("loss" in m or "accuracy" in m):
            return r["round_id"], m
    return 0, dict(initial or {})


class _StateCollector(Collector):
    """Reads the coordinator's store and federation at scrape time."""

    def __init__(self, coordinator: "Coordinator"):
        self.c = coordinator

    def collect(self):
        try:
            rounds = self.c.store.rounds()
            updates = self.c.store.updates()
            initial = self.c.store.get_meta("initial_metrics", {})
        except Exception as e:  # noqa: BLE001 - a closed store must not break the scrape
            log.debug("metrics: store unavailable (%s)", e)
            return
        done = [r for r in rounds if r["state"] != R.OPEN and r["closed_at"] is not None]
        by_state = collections.Counter(r["state"] for r in done)
        yield _counter("edgefed_rounds_completed", "Rounds aggregated into the global adapter",
                       by_state[R.AGGREGATED])
        yield _counter("edgefed_rounds_failed", "Rounds closed below quorum (global unchanged)", by_state[R.FAILED])
        durations = [r["closed_at"] - r["opened_at"] for r in done]
        yield HistogramMetricFamily("edgefed_round_duration_seconds", "Wall time from round open to close",
                                    buckets=histogram_buckets(durations, ROUND_BUCKETS), sum_value=sum(durations))
        agg = [float(r["metrics"]["aggregate_s"]) for r in done if "aggregate_s" in (r.get("metrics") or {})]
        yield HistogramMetricFamily("edgefed_aggregation_seconds", "Time to aggregate one round's updates "
                                    "(decode, aggregate, evaluate, write)",
                                    buckets=histogram_buckets(agg, AGGREGATION_BUCKETS), sum_value=sum(agg))
        cur = self.c.fed.current
        yield _gauge("edgefed_current_round", "Id of the newest round (open or closed)", self.c.fed.last_round_id)
        yield _gauge("edgefed_round_open", "1 while a round is open", int(cur is not None and cur.state == R.OPEN))
        yield _gauge("edgefed_rounds_target", "Rounds to aggregate before the federation is done",
                     self.c.cfg.rounds)
        devices = dict(self.c.fed.devices)  # snapshot; the dict copy is atomic under the GIL
        active = R.available(devices, self.c.fed.cfg, self.c.clock())
        yield _gauge("edgefed_devices_registered", "Devices enrolled", len(devices))
        yield _gauge("edgefed_devices_active", "Devices heard from within --heartbeat-timeout", len(active))
        acc = CounterMetricFamily("edgefed_updates_accepted", "Updates accepted, by kind", labels=["kind"])
        kinds = collections.Counter(u["kind"] for u in updates)
        for kind in ("LORA", "ZO"):
            acc.add_metric([kind], kinds.get(kind, 0))
        yield acc
        yield _counter("edgefed_upload_bytes", "Wire bytes of accepted updates (every serialized message)",
                       sum(int(u["wire_bytes"]) for u in updates))
        rid, m = last_eval(rounds, initial)
        yield _gauge("edgefed_eval_round", "Round whose global adapter the eval gauges describe (0: initial)", rid)
        for key in ("loss", "accuracy"):
            if key in m:
                yield _gauge(f"edgefed_eval_{key}", f"Held-out {key} of the newest global adapter", float(m[key]))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class CoordinatorMetrics:
    """One coordinator's registry: scrape-time state plus live rejection / download counters."""

    def __init__(self, coordinator: "Coordinator", process: bool = True):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(coordinator))
        if process:
            ProcessCollector(registry=self.registry)
        self._rejected = Counter("edgefed_updates_rejected", "Updates refused, by reason", ["reason"],
                                 registry=self.registry)
        self._down = Counter("edgefed_download_bytes", "Bytes of global adapters streamed to devices",
                             registry=self.registry)
        self._lock = threading.Lock()
        self.rejections: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self.download_bytes = 0

    def reject(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.rejections[reason] += 1
            self.recent.append({"ts": time.time(), "reason": reason, "detail": detail[:200]})
        self._rejected.labels(reason).inc()

    def rpc_error(self, fn: Callable[..., Any] | str, exc: BaseException) -> None:
        """Called by the servicer for every domain error; counts those of the upload calls."""
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
        if name in UPLOAD_CALLS:
            self.reject(reject_reason(exc), str(exc))

    def downloaded(self, nbytes: int) -> None:
        with self._lock:
            self.download_bytes += int(nbytes)
        self._down.inc(nbytes)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"rejected": dict(self.rejections), "download_bytes": self.download_bytes,
                    "recent_rejections": list(self.recent)}

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
