"""Import footprint and idle memory of the device runtime vs bare `import torch, transformers`.

Each scenario runs in a fresh interpreter (`--repeats` times, medians reported) that executes
a list of import steps and records, after each step, the resident set size (VmRSS from
/proc/self/status) and the cumulative wall time. Scenarios:
  python                          the interpreter alone
  torch+transformers              `import torch, transformers` (the target's baseline; lazy)
  torch+transformers model-ready  + transformers.modeling_utils and the Auto* classes: what any
                                  `from_pretrained` imports before it reads a weight
  libraries                       + peft (which imports bitsandbytes when it is installed)
  join                            everything `edge-runtime join` loads before its first round:
                                  the above + grpc/protos, edge_runtime.client, the CLI, planner,
                                  data, LocalTrainer, metrics
  join, bitsandbytes kept out     the same with bitsandbytes hidden (plans without int8/nf4)
Target: runtime overhead above bare torch+transformers <= 50 MB (MB = 10^6 B; MiB also printed);
the other baselines say which part of that is transformers, bitsandbytes, peft or our code.

    python tools/bench_footprint.py [--repeats 3] [--out docs/footprint.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 50.0
MODELING = ("import transformers\n"
            "transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification\n"
            "transformers.AutoModelForCausalLM\n"
            "from transformers.modeling_utils import PreTrainedModel\n")  # what every from_pretrained imports
PEFT_LAZY = "import peft\npeft.LoraConfig, peft.get_peft_model, peft.get_peft_model_state_dict"
NO_BNB = "import sys\nsys.modules['bitsandbytes'] = None  # peft then skips its bitsandbytes integration"
BARE = [("torch", "import torch"), ("transformers", "import transformers")]
RUNTIME = [
    ("grpc + protos", "import grpc\nfrom protos import federation_pb2, federation_pb2_grpc, wire"),
    ("edge_runtime.client", "import edge_runtime.client"),
    ("cli (join parser)", "import edge_runtime.cli\nedge_runtime.cli.build_parser()"),
    ("plan/profile/planner/data", "import edge_runtime.plan, edge_runtime.profile, edge_runtime.planner, "
                                  "edge_runtime.modelspec, edge_runtime.data"),
    ("LocalTrainer", "from edge_runtime.training.session import LocalTrainer"),
    ("metrics", "import edge_runtime.metrics"),
]
SCENARIOS: dict[str, list[tuple[str, str]]] = {
    "python": [],
    "torch+transformers": BARE,  # the brief's baseline; `import transformers` is lazy
    "torch+transformers model-ready": BARE + [("model classes", MODELING)],
    "libraries": BARE + [("model classes", MODELING), ("peft", PEFT_LAZY)],
    "join": BARE + [("model classes", MODELING), ("peft (+bitsandbytes)", PEFT_LAZY)] + RUNTIME,
    "join, bitsandbytes kept out": [("hide bitsandbytes", NO_BNB)] + BARE + [("model classes", MODELING),
                                                                          ("peft", PEFT_LAZY)] + RUNTIME,
}
CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
def rss():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
out = [{"step": "start", "rss": rss(), "t": 0.0}]
for name, code in json.loads(sys.argv[1]):
    exec(code, {})
    out.append({"step": name, "rss": rss(), "t": time.perf_counter() - t0})
print("FOOTPRINT " + json.dumps(out))
"""


def run_scenario(steps: list[tuple[str, str]], threads: int = 1) -> list[dict]:
    """One fresh interpreter: [{step, rss (bytes), t (s since start)}]."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(steps)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    wall = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith("FOOTPRINT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"footprint child failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    rows = json.loads(line[len("FOOTPRINT "):])
    rows.append({"step": "process wall", "rss": rows[-1]["rss"], "t": wall})
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    return [{"step": rs[0]["step"], "rss_bytes": int(statistics.median(r["rss"] for r in rs)),
             "t_s": round(statistics.median(r["t"] for r in rs), 3)} for rs in zip(*runs)]


def measure(repeats: int) -> dict:
    scen = {}
    for name, steps in SCENARIOS.items():
        runs = [run_scenario(steps) for _ in range(repeats)]
        rows = median_rows(runs)
        final = rows[-2]  # last import step (the row after it is the whole process' wall time)
        scen[name] = {"steps": rows, "rss_bytes": final["rss_bytes"], "import_s": final["t_s"],
                      "process_wall_s": rows[-1]["t_s"]}
    rss = {k: v["rss_bytes"] for k, v in scen.items()}
    over = {  # (scenario, baseline) -> bytes above the baseline
        "join - torch+transformers": rss["join"] - rss["torch+transformers"],
        "join - model-ready": rss["join"] - rss["torch+transformers model-ready"],
        "join without bitsandbytes - model-ready":
            rss["join, bitsandbytes kept out"] - rss["torch+transformers model-ready"],
        "join - libraries (our code + grpc)": rss["join"] - rss["libraries"],
    }
    overhead = over["join - torch+transformers"]
    return {
        "scenarios": scen,
        "overheads_bytes": over,
        "join_overhead_bytes": overhead,
        "join_overhead_mb": round(overhead / 1e6, 1),
        "join_import_overhead_s": round(scen["join"]["import_s"] - scen["torch+transformers"]["import_s"], 3),
        "target_mb": TARGET_MB,
        "meets_target": overhead / 1e6 <= TARGET_MB,
        "meets_target_model_ready": over["join - model-ready"] / 1e6 <= TARGET_MB,
        "meets_target_model_ready_without_bnb": over["join without bitsandbytes - model-ready"] / 1e6 <= TARGET_MB,
        "repeats": repeats,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count()},
        "versions": _versions(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "transformers", "peft", "grpcio", "prometheus-client"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "none"
    return out


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def print_report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="fresh-process footprint (median of %d)" % res["repeats"])
    for col in ("scenario", "RSS MiB", "import s", "process wall s"):
        t.add_column(col, justify="right" if col != "scenario" else "left")
    for name, s in res["scenarios"].items():
        t.add_row(name, _mib(s["rss_bytes"]), f"{s['import_s']:.2f}", f"{s['process_wall_s']:.2f}")
    con.print(t)
    steps = Table(title="join: where the memory goes (cumulative, one process)")
    for col in ("step", "RSS MiB", "+MiB", "t s"):
        steps.add_column(col, justify="right" if col != "step" else "left")
    prev = None
    for r in res["scenarios"]["join"]["steps"][:-1]:
        steps.add_row(r["step"], _mib(r["rss_bytes"]), "" if prev is None else _mib(r["rss_bytes"] - prev),
                      f"{r['t_s']:.2f}")
        prev = r["rss_bytes"]
    con.print(steps)
    o = Table(title=f"runtime overhead (target <= {res['target_mb']:.0f} MB)")
    for col in ("comparison", "MB", "MiB", "target"):
        o.add_column(col, justify="right" if col != "comparison" else "left")
    for k, v in res["overheads_bytes"].items():
        o.add_row(k, f"{v / 1e6:.1f}", _mib(v), "[green]ok[/]" if v / 1e6 <= res["target_mb"] else "[red]over[/]")
    con.print(o)
    con.print(f"join imports take {res['join_import_overhead_s']:.2f}s more than bare torch+transformers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "footprint.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench_footprint reads /proc/self/status: run it on Linux")
    res = measure(args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
