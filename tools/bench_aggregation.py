"""Factor-space SVD redistribution vs the dense route (form dW, full SVD, truncate).

Each (route, case) runs in a fresh subprocess with `--threads` intra-op threads so timings
and memory do not interfere. Peak memory: the worker builds its inputs, then resets the
kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0),
runs the route and reads VmHWM from /proc/self/status: peak RSS during the computation
minus RSS before it (torch CPU tensors live in malloc/mmap memory, which RSS sees and
tracemalloc does not). Where clear_refs is not writable, ru_maxrss is used instead.
Timing: the factor route is timed as the best of up to 3 runs (stopping after 10 s), the dense route once (it is slow);
the dense SVD is run once per shape unless --dense-every-case. Relative error: ||dW_factor,r - dW_dense,r||_F / ||dW_dense,r||_F for the smallest, median
and largest requested rank, computed from the returned factors with the trace identity
(never forming a dense matrix in the parent).

    python tools/bench_aggregation.py            # full: 4096x4096 and 4096x11008, 10 and 100 devices
    python tools/bench_aggregation.py --quick    # CI smoke: 512x512 and 512x1376
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_updates(out: int, inp: int, ranks: list[int], seed: int):
    import torch

    from coordinator.aggregation import LoraUpdate, lora_scale
    ups = []
    for k, r in enumerate(ranks):
        g = torch.Generator().manual_seed(seed * 100003 + k)
        A = torch.randn(r, inp, generator=g) / inp ** 0.5
        B = torch.randn(out, r, generator=g) * 0.02
        ups.append(LoraUpdate(A=A, B=B, scale=lora_scale(16.0, r), weight=float(1 + (k * 7) % 13)))
    return ups


def worker(spec: dict) -> dict:
    import torch

    from coordinator.aggregation import svd_redistribute
    torch.set_num_threads(spec["threads"])
    ups = make_updates(spec["out"], spec["in"], spec["ranks"], spec["seed"])
    requested = spec["ranks"]
    torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64))  # warm up LAPACK
    torch.linalg.svd(torch.randn(16, 16, dtype=torch.float64))
    base = _rss_kib("VmRSS")
    exact_peak = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    runs: list[float] = []
    if spec["route"] == "factor":  # cheap: best of `repeats` runs (the machine may be shared)
        for _ in range(spec.get("repeats", 3)):
            t_run = time.perf_counter()
            outs = svd_redistribute(ups, requested)
            runs.append(time.perf_counter() - t_run)
            if sum(runs) > spec.get("repeat_budget_s", 10.0):
                break
        factors = {r: (o.B, o.A) for r, o in zip(requested, outs)}
        t_form = t_svd = None
    else:
        w = torch.tensor([u.weight for u in ups], dtype=torch.float64)
        p = w / w.sum()
        dW = torch.zeros(spec["out"], spec["in"], dtype=torch.float64)
        for k, u in enumerate(ups):  # dense dW = sum p_k s_k B_k A_k, (out, in)
            dW.addmm_((p[k] * u.scale) * u.B.double(), u.A.double())
        t_form = time.perf_counter() - t0
        if spec.get("form_only"):  # dense SVD time reused from this shape's first case
            peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"seconds": t_form, "form_seconds": t_form, "svd_seconds": None, "form_only": True,
                    "peak_extra_bytes": max(0, (peak - base)) * 1024, "total_rank": sum(requested)}
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        t_svd = time.perf_counter() - t0 - t_form
        del dW
        factors = {}
        for r in requested:
            root = S[:r].sqrt()
            factors[r] = ((U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float())
    elapsed = min(runs) if runs else time.perf_counter() - t0
    cpu = (time.process_time() - c0) / max(len(runs), 1)  # CPU seconds of all threads (mean per run)
    peak = _rss_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    keep = sorted(set(requested))
    keep = sorted({keep[0], keep[len(keep) // 2], keep[-1]})
    torch.save({r: factors[r] for r in keep}, spec["save"])
    return {"seconds": elapsed, "cpu_seconds": cpu, "all_runs_seconds": runs or [elapsed], "form_seconds": t_form, "svd_seconds": t_svd,
            "peak_extra_bytes": max(0, (peak - base)) * 1024, "peak_method": "VmHWM" if exact_peak else "ru_maxrss",
            "total_rank": sum(requested)}


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"worker failed for {spec['route']} {spec['out']}x{spec['in']}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def rel_error(fa: dict, da: dict) -> float:
    """max over saved ranks of ||B1 A1 - B2 A2||_F / ||B2 A2||_F, exactly in factor space.

    ||B A||_F = ||Rb Ra^T||_F for QR factorisations B = Qb Rb, A^T = Qa Ra (orthogonal
    invariance), which avoids the cancellation of expanding the squared difference.
    """
    import torch

    def fro(B, A):
        return float(torch.linalg.norm(torch.linalg.qr(B)[1] @ torch.linalg.qr(A.T)[1].T))

    worst = 0.0
    for r in fa:
        B1, A1 = (t.double() for t in fa[r])
        B2, A2 = (t.double() for t in da[r])
        diff = fro(torch.cat([B1, -B2], dim=1), torch.cat([A1, A2], dim=0))
        worst = max(worst, diff / fro(B2, A2))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes for a CI smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads per worker (default 2)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_aggregation.json"))
    ap.add_argument("--md", default=None, help="also write the markdown table to this file")
    ap.add_argument("--dense-every-case", action="store_true",
                    help="run the dense SVD for every case (default: once per shape; later device counts time the "
                         "dense formation and reuse that shape's SVD time, the SVD cost being independent of the data)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import random

    import torch
    if args.quick:
        shapes, counts, rmin, rmax = [(512, 512), (512, 1376)], [10, 20], 4, 32
    else:
        shapes, counts, rmin, rmax = [(4096, 4096), (4096, 11008)], [10, 100], 4, 64
    rows = []
    dense_svd: dict[tuple[int, int], tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:  # the first device count for every shape first (dense SVD timed there)
            for out, inp in shapes:
                rng = random.Random(n * 7919 + inp)
                ranks = [rng.randint(rmin, rmax) for _ in range(n)]
                res = {}
                first = (out, inp) not in dense_svd
                for route in ("factor", "dense"):
                    spec = {"route": route, "out": out, "in": inp, "ranks": ranks, "seed": n, "threads": args.threads,
                            "save": os.path.join(tmp, f"{route}.pt"),
                            "form_only": route == "dense" and not first and not args.dense_every_case}
                    res[route] = run_worker(spec)
                    print(f"  {out}x{inp} {n:>3} devices {route:>6}: {res[route]['seconds']:.3f} s", flush=True)
                d = res["dense"]
                if d.get("form_only"):
                    svd_s, svd_peak = dense_svd[(out, inp)]
                    d.update(svd_seconds=svd_s, seconds=d["form_seconds"] + svd_s,
                             peak_extra_bytes=max(d["peak_extra_bytes"], svd_peak), svd_reused=True)
                    err = None
                else:
                    dense_svd.setdefault((out, inp), (d["svd_seconds"], d["peak_extra_bytes"]))
                    err = rel_error(torch.load(os.path.join(tmp, "factor.pt")), torch.load(os.path.join(tmp, "dense.pt")))
                rows.append({"out": out, "in": inp, "devices": n, "total_rank": sum(ranks),
                             "ranks_min_max": [min(ranks), max(ranks)],
                             "factor": res["factor"], "dense": res["dense"],
                             "speedup": res["dense"]["seconds"] / res["factor"]["seconds"],
                             "memory_ratio": res["dense"]["peak_extra_bytes"] / max(res["factor"]["peak_extra_bytes"], 1),
                             "rel_error": err})
                write_json(args.out, rows, args)  # after every case, so a cut-short run keeps its results
                if args.md:
                    Path(args.md).write_text(markdown(rows))
    write_json(args.out, rows, args)
    table = markdown(rows)
    print_table(rows)
    if args.md:
        Path(args.md).write_text(table)
    print(f"wrote {args.out}")


def write_json(path: str, rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    rmin, rmax = (4, 32) if args.quick else (4, 64)
    meta = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "rank_range": [rmin, rmax], "dense_dtype": "float64", "factor_internal_dtype": "float64",
            "memory_method": "VmHWM after /proc/self/clear_refs reset, minus VmRSS before the route (per subprocess)",
            "load_average_1m": os.getloadavg()[0], "complete": len(rows) == 4}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def fmt_err(e: float | None) -> str:
    return "n/a (SVD time reused)" if e is None else f"{e:.1e}"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape (out x in) | devices | total rank R | factor-space s | dense s (form + SVD) | speed-up | "
             "factor peak MiB | dense peak MiB | rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["dense"]
        lines.append(f"| {r['out']}x{r['in']} | {r['devices']} | {r['total_rank']} | {r['factor']['seconds']:.3f} | "
                     f"{d['seconds']:.2f} ({d['form_seconds']:.2f} + {d['svd_seconds']:.2f}) | {r['speedup']:.0f}x | "
                     f"{r['factor']['peak_extra_bytes'] / 2**20:.0f} | {d['peak_extra_bytes'] / 2**20:.0f} | "
                     f"{fmt_err(r['rel_error'])} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="svd_redistribute: factor space vs dense")
    for c in ("shape", "devices", "R", "factor s", "dense s", "speed-up", "factor MiB", "dense MiB", "rel err"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(f"{r['out']}x{r['in']}", str(r["devices"]), str(r["total_rank"]), f"{r['factor']['seconds']:.3f}",
                  f"{r['dense']['seconds']:.2f}", f"{r['speedup']:.0f}x",
                  f"{r['factor']['peak_extra_bytes'] / 2**20:.0f}", f"{r['dense']['peak_extra_bytes'] / 2**20:.0f}",
                  fmt_err(r["rel_error"]))
    Console().print(t)


if __name__ == "__main__":
    main()
