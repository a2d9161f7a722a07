"""Prometheus metrics of one device in `edge-runtime join --metrics-port N`.

`RuntimeMetrics` owns its registry; `run_join` feeds it through `JoinConfig.on_round` (each
round's report) and `JoinConfig.on_retry` (each retried call). Names are prefixed
`edgeruntime_`; see docs/operations.md.
"""
from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.process_collector import ProcessCollector

TRAIN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class RuntimeMetrics:
    """Counters and gauges of the join loop, in a registry of their own."""

    def __init__(self, process: bool = True):
        reg = self.registry = CollectorRegistry()
        if process:
            ProcessCollector(registry=reg)
        self.rounds = Counter("edgeruntime_rounds", "Rounds trained, by whether the coordinator accepted the update",
                              ["accepted"], registry=reg)
        self.train_seconds = Histogram("edgeruntime_train_seconds", "Local training time per round",
                                       buckets=TRAIN_BUCKETS, registry=reg)
        self.peak_rss = Gauge("edgeruntime_peak_rss_bytes", "Largest training peak resident memory seen in a round",
                              registry=reg)
        self.last_peak_rss = Gauge("edgeruntime_last_round_peak_rss_bytes", "Peak resident memory of the last round",
                                   registry=reg)
        self.upload_bytes = Counter("edgeruntime_upload_bytes", "Update bytes sent to the coordinator", registry=reg)
        self.download_bytes = Counter("edgeruntime_download_bytes", "Global adapter bytes received",
                                      registry=reg)
        self.transfer_seconds = Counter("edgeruntime_transfer_seconds", "Time spent streaming, by direction",
                                        ["direction"], registry=reg)
        self.retries = Counter("edgeruntime_retries", "Calls retried after UNAVAILABLE / DEADLINE_EXCEEDED, by call",
                               ["call"], registry=reg)
        self.last_loss = Gauge("edgeruntime_last_train_loss", "Mean training loss of the last round", registry=reg)
        self.rank = Gauge("edgeruntime_assigned_rank", "LoRA rank the coordinator assigned", registry=reg)
        self.last_round = Gauge("edgeruntime_last_round_id", "Coordinator round id of the last round trained",
                                registry=reg)
        self._lock = threading.Lock()
        self._peak = 0

    def observe_round(self, report: dict[str, Any]) -> None:
        """Record one round's report from `run_join` (keys: round_id, rank, train_s, train_loss,
        peak_rss_bytes, download_bytes, download_s, upload_bytes, upload_s, accepted)."""
        self.rounds.labels("true" if report.get("accepted") else "false").inc()
        self.train_seconds.observe(float(report.get("train_s", 0.0)))
        peak = int(report.get("peak_rss_bytes") or 0)
        with self._lock:
            self._peak = max(self._peak, peak)
            self.peak_rss.set(self._peak)
        self.last_peak_rss.set(peak)
        self.upload_bytes.inc(int(report.get("upload_bytes") or 0))
        self.download_bytes.inc(int(report.get("download_bytes") or 0))
        self.transfer_seconds.labels("up").inc(float(report.get("upload_s") or 0.0))
        self.transfer_seconds.labels("down").inc(float(report.get("download_s") or 0.0))
        if report.get("train_loss") is not None:
            self.last_loss.set(float(report["train_loss"]))
        self.rank.set(int(report.get("rank") or 0))
        self.last_round.set(int(report.get("round_id") or 0))

    def retry(self, call: str) -> None:
        """One retried call (GetTask, DownloadGlobal, UploadUpdate, ...)."""
        self.retries.labels(call).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, int]:
        """Serve /metrics from a daemon thread; port 0 picks a free port. Returns (server, port)."""
        if not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port {port} is not a TCP port: use 1-65535 (or leave it off)")
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)
