"""Measure this device: memory, accelerator, GEMM throughput, optional network probe.

`measure_device(quick=True)` returns a DeviceProfile (kind="measured") in a few seconds.
`measure_runtime_overhead()` is the killable memory (`guard.anon_bytes`: RssAnon + RssShmem, what
the MemoryGuard and an OOM killer count) of a process after importing torch, transformers and peft:
the fixed part of every training process's peak (cached under
~/.cache/edge_runtime/runtime_overhead.json, keyed by the installed versions and the measure).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_runtime.profile import DeviceProfile

CACHE_DIR = Path(os.environ.get("EDGE_RUNTIME_CACHE", Path.home() / ".cache" / "edge_runtime"))
_OVERHEAD: int | None = None
_OVERHEAD_SCRIPT = ("import torch, transformers, peft\n"
                    "from edge_runtime.training.guard import anon_bytes\n"
                    "print(anon_bytes())")
OVERHEAD_MEASURE = "anon"  # part of the cache key: a cached RSS figure (before issue 15) is measured again


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for pkg in ("torch", "transformers", "peft"):
        try:
            out.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg}=none")
    return ",".join(out + [platform.machine(), sys.version.split()[0], OVERHEAD_MEASURE])


def measure_runtime_overhead(refresh: bool = False) -> int:
    """Killable bytes (`guard.anon_bytes`, the one measure of memory the guard, the planner and the
    estimator share) after `import torch, transformers, peft` in a fresh interpreter. The mapped
    libraries' clean file pages (~90 MiB on x86-64) are reclaimable and not counted, as the guard
    does not count them.

    Computed once per process and cached on disk per package versions. Falls back to 320 MiB
    (measured on x86-64, torch 2.13 CPU: 304 MiB) if the subprocess cannot run.
    """
    global _OVERHEAD
    if _OVERHEAD is not None and not refresh:
        return _OVERHEAD
    key = _versions()
    cache = CACHE_DIR / "runtime_overhead.json"
    if not refresh:
        try:
            d = json.loads(cache.read_text())
            if d.get("key") == key and int(d["bytes"]) > 0:
                _OVERHEAD = int(d["bytes"])
                return _OVERHEAD
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        root = str(Path(__file__).resolve().parents[1])  # edge_runtime importable without an install
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        out = subprocess.run([sys.executable, "-c", _OVERHEAD_SCRIPT], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path))
        value = int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 320 * 2**20
    _OVERHEAD = value
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "bytes": value, "measured_at": time.time()}))
    except OSError:
        pass
    return value


# ----------------------------------------------------------------------------- hardware

def detect_jetson() -> str:
    """Jetson model string from /proc/device-tree/model or /etc/nv_tegra_release, else ''."""
    for p in (Path("/proc/device-tree/model"), Path("/etc/nv_tegra_release")):
        try:
            txt = p.read_text(errors="ignore").strip("\x00 \n")
        except OSError:
            continue
        if p.name == "nv_tegra_release" or "jetson" in txt.lower() or "tegra" in txt.lower():
            return txt.splitlines()[0][:120] if txt else "NVIDIA Jetson"
    return ""


def _jtop_info() -> dict[str, Any]:
    """Board info from jetson-stats (jtop) when installed, else {}."""
    try:
        from jtop import jtop  # type: ignore
    except ImportError:
        return {}
    try:
        with jtop() as j:
            return {"board": dict(j.board.get("hardware", {})), "memory": dict(j.memory.get("RAM", {}))}
    except Exception:  # jtop needs its service running; enrichment is optional
        return {}


def gemm_gflops(dtype: str = "fp32", n: int = 512, seconds: float = 0.5, device: str = "cpu") -> float:
    """Sustained square-matmul throughput in GFLOP/s (2*n^3 flops per matmul)."""
    import torch
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    bm = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    (a @ bm)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ bm
        iters += 1
        if iters % 4 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    dt_s = time.perf_counter() - t0
    return 2.0 * n ** 3 * iters / dt_s / 1e9


def single_thread_gflops(seconds: float = 0.5) -> float:
    """fp32 GEMM GFLOP/s of ONE torch thread (the host speed emulated devices are paced against)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return gemm_gflops("fp32", 512, seconds)
    finally:
        torch.set_num_threads(before)


def probe_coordinator(address: str, bulk_bytes: int = 0, timeout: float = 3.0) -> dict[str, float]:
    """TCP connect latency to HOST:PORT (median of 3) and, when bulk_bytes > 0, the rate of a
    bulk send (Mbit/s; an upper bound on uplink since the peer may not read at line rate)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} is invalid: expected HOST:PORT")
    lat = []
    for _ in range(3):
        t0 = time.perf_counter()
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            lat.append((time.perf_counter() - t0) * 1000)
    out = {"latency_ms": sorted(lat)[1]}
    if bulk_bytes > 0:
        payload = b"\0" * min(bulk_bytes, 1 << 20)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            sent, t0 = 0, time.perf_counter()
            try:
                while sent < bulk_bytes:
                    sent += s.send(payload)
            except OSError:
                pass
            dt = max(time.perf_counter() - t0, 1e-6)
        out["uplink_mbps"] = sent * 8 / dt / 1e6
    return out


def measure_device(quick: bool = True, coordinator: str | None = None, bulk_bytes: int = 0,
                   name: str | None = None) -> DeviceProfile:
    """Measure this machine into a DeviceProfile (kind='measured'); quick mode takes < 5 s."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    total, avail = int(vm.total), int(vm.available)
    accel, accel_name, unified = "cpu", platform.processor() or platform.machine(), True
    budget = int(avail * 0.8)
    device = "cpu"
    jetson = detect_jetson()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        accel_name, device = props.name, "cuda"
        if jetson:
            accel = "jetson"
        else:
            accel, unified = "cuda", False
            total = int(props.total_memory)
            free, _ = torch.cuda.mem_get_info()
            budget = int(free * 0.9)
    elif jetson:
        accel, accel_name = "jetson", jetson
    secs = 0.25 if quick else 1.5
    n = 512 if device == "cpu" and quick else (1024 if device == "cpu" else 4096)
    gflops = {"fp32": round(gemm_gflops("fp32", n, secs, device), 1)}
    for dt in ("bf16", "fp16"):
        if device == "cuda" or not quick:
            try:
                gflops[dt] = round(gemm_gflops(dt, n, secs, device), 1)
            except (RuntimeError, TypeError):
                pass
    precisions = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else []) + _quant_precisions()
    notes = [f"measured {time.strftime('%Y-%m-%d %H:%M:%S')} ({'quick' if quick else 'full'}), "
             f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"]
    extra = _jtop_info() if jetson else {}
    if extra:
        notes.append(f"jtop: {json.dumps(extra)[:300]}")
    kw: dict[str, Any] = {}
    if coordinator:
        net = probe_coordinator(coordinator, bulk_bytes)
        kw["latency_ms"] = round(net["latency_ms"], 2)
        if "uplink_mbps" in net:
            kw["uplink_mbps"] = round(net["uplink_mbps"], 1)
        notes.append(f"network probe against {coordinator}: {net}")
    return DeviceProfile(
        name=name or (socket.gethostname().split(".")[0] or "this-device").replace(" ", "-"),
        memory_total_bytes=total, memory_budget_bytes=min(budget, total), compute_gflops=gflops,
        kind="measured", accelerator=accel, accelerator_name=accel_name[:120], unified_memory=unified,
        precisions=list(dict.fromkeys(precisions)), source="edge_runtime.measure.measure_device",
        notes="; ".join(notes), **kw)


def _quant_precisions() -> list[str]:
    """Quantized base precisions whose libraries are importable here (no import side effects kept)."""
    from importlib.util import find_spec

    from edge_runtime.training.imports import bitsandbytes_installed  # sees it even where this process hides it
    out = []
    if bitsandbytes_installed():
        out += ["int8", "nf4"]
    if find_spec("optimum") is not None and find_spec("optimum.quanto") is not None:
        out += ["int8", "int4"]
    return list(dict.fromkeys(out))
