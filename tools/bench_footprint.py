"""Import footprint and idle memory of the device runtime vs bare `import torch, transformers`.

Each scenario runs in a fresh interpreter (`--repeats` times, medians reported) that executes
a list of steps and records, after each step, the resident set size (VmRSS from
/proc/self/status), the cumulative wall time and, at the end, whether torch / transformers /
peft / bitsandbytes were imported. Scenarios:
  python                             the interpreter alone
  torch+transformers                 `import torch, transformers` (the target's literal baseline; lazy)
  torch+transformers model-ready     + transformers.modeling_utils and the Auto* classes: what any
                                     `from_pretrained` imports before it reads a weight
  + peft (with bitsandbytes)         + peft, which imports bitsandbytes when it is installed
  + peft (bitsandbytes hidden)       the same with bitsandbytes hidden (edge_runtime.training.imports)
  join idle (registered, waiting)    a real `edge-runtime join` (plaintext, --plan given) that has
                                     registered with a coordinator which will not open a round, and
                                     has heartbeated / polled for a few seconds
  join training, fp32 plan (bnb hidden)  the idle join + what its first training task imports
                                     (`use_bitsandbytes(needs_bitsandbytes("fp32"))`, transformers'
                                     model classes, peft, LocalTrainer, step-down); no model is loaded
  join training, nf4 plan            the same for an nf4 plan (the bitsandbytes route)
The coordinator (a tiny random BERT, min_devices 1000) runs in its own process, started once.
Target: runtime overhead above bare torch+transformers <= 50 MB (MB = 10^6 B; MiB also printed);
the other baselines say which part of that is transformers, bitsandbytes, peft or our code.

    python tools/bench_footprint.py [--repeats 3] [--out docs/footprint.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 50.0
MODELING = ("import transformers\n"
            "transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification\n"
            "transformers.AutoModelForCausalLM\n"
            "from transformers.modeling_utils import PreTrainedModel\n")  # what every from_pretrained imports
PEFT_LAZY = "import peft\npeft.LoraConfig, peft.get_peft_model, peft.get_peft_model_state_dict"
BNB_FOR = ("from edge_runtime.training.imports import needs_bitsandbytes, use_bitsandbytes\n"
           "use_bitsandbytes(needs_bitsandbytes({precision!r}))  # what load_base does before peft")
BARE = [("torch", "import torch"), ("transformers", "import transformers")]
MODEL_READY = BARE + [("model classes", MODELING)]
# a real join in a daemon thread; {args} is filled in per run (coordinator address, files)
JOIN_IDLE = r"""
import logging, sys, threading, time
from edge_runtime import cli
registered = threading.Event()
class _Registered(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("registered as"):
            registered.set()
logging.getLogger("edge_runtime.client").addHandler(_Registered())
threading.Thread(target=cli.main, args=({args!r},), daemon=True, name="join").start()
if not registered.wait(120):
    raise RuntimeError("the device did not register within 120 s")
time.sleep({wait_s})  # heartbeats and GetTask polls while no round is open
"""
FIRST_TASK = [("LocalTrainer + step-down modules", "from edge_runtime.training.session import LocalTrainer\n"
                                                   "import edge_runtime.stepdown")]


def _first_task(precision: str) -> list[tuple[str, str]]:
    """What the join loop imports at its first training task for a plan at `precision`."""
    bnb = "bitsandbytes loaded" if precision in ("int8", "nf4") else "bitsandbytes hidden"
    return ([(f"{precision} plan: {bnb}", BNB_FOR.format(precision=precision))] + MODEL_READY
            + [("peft", PEFT_LAZY)] + FIRST_TASK)


SCENARIOS: dict[str, list[tuple[str, str]]] = {
    "python": [],
    "torch+transformers": BARE,  # the brief's baseline; `import transformers` is lazy
    "torch+transformers model-ready": MODEL_READY,
    "+ peft (with bitsandbytes)": MODEL_READY + [("peft (+bitsandbytes)", PEFT_LAZY)],
    "+ peft (bitsandbytes hidden)": [("hide bitsandbytes", BNB_FOR.format(precision="fp32"))] + MODEL_READY
                                    + [("peft", PEFT_LAZY)],
    "join idle (registered, waiting)": [("join: registered, polling", JOIN_IDLE)],
    "join training, fp32 plan (bnb hidden)": [("join: registered, polling", JOIN_IDLE)] + _first_task("fp32"),
    "join training, nf4 plan": [("join: registered, polling", JOIN_IDLE)] + _first_task("nf4"),
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
loaded = {m: sys.modules.get(m) is not None for m in ("torch", "transformers", "peft", "bitsandbytes", "grpc")}
print("FOOTPRINT " + json.dumps({"steps": out, "loaded": loaded}), flush=True)
os._exit(0)  # a join thread may still be polling
"""


class Coordinator:
    """A plaintext coordinator in its own process that never opens a round (min_devices 1000),
    plus the files a device needs to join it (tiny model, plan, profile, 256 records)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="footprint-"))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Coordinator":
        from edge_runtime.data import load_sst2
        from edge_runtime.plan import Plan
        from edge_runtime.training.tiny import make_tiny_bert

        model = make_tiny_bert(self.dir / "bert")
        (self.dir / "plan.json").write_text(Plan(target_modules=["query", "value"]).to_json())
        (self.dir / "data.jsonl").write_text("\n".join(json.dumps(r) for r in load_sst2("train", limit=256)))
        self.log = open(self.dir / "coordinator.log", "w")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.cli", "serve", "--model", str(model),
             "--store", str(self.dir / "store"), "--host", "127.0.0.1", "--port", str(self.port), "--insecure",
             "--min-devices", "1000"],
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {(self.dir / 'coordinator.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("coordinator did not listen within 180 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def join_args(self) -> list[str]:
        return ["join", f"127.0.0.1:{self.port}", "--insecure",
                "--profile", str(ROOT / "profiles" / "jetson-nano-4gb.yaml"),
                "--model", str(self.dir / "bert"), "--data", str(self.dir / "data.jsonl"),
                "--plan", str(self.dir / "plan.json"), "--threads", "1"]


def _env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
            "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def run_scenario(steps: list[tuple[str, str]], threads: int = 1) -> dict:
    """One fresh interpreter: {"steps": [{step, rss (bytes), t (s since start)}], "loaded": {module: bool}}."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(steps)], cwd=ROOT, env=_env(threads),
                       capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    line = next((x for x in p.stdout.splitlines() if x.startswith("FOOTPRINT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"footprint child failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(line[len("FOOTPRINT "):])
    res["steps"].append({"step": "process wall", "rss": res["steps"][-1]["rss"], "t": wall})
    return res


def median_rows(runs: list[list[dict]]) -> list[dict]:
    return [{"step": rs[0]["step"], "rss_bytes": int(statistics.median(r["rss"] for r in rs)),
             "t_s": round(statistics.median(r["t"] for r in rs), 3)} for rs in zip(*runs)]


def _fill(steps: list[tuple[str, str]], coord: Coordinator, wait_s: float) -> list[tuple[str, str]]:
    return [(n, c.format(args=coord.join_args(), wait_s=wait_s) if c is JOIN_IDLE else c) for n, c in steps]


def measure(repeats: int, wait_s: float = 6.0) -> dict:
    scen = {}
    with Coordinator() as coord:
        for name, steps in SCENARIOS.items():
            runs = [run_scenario(_fill(steps, coord, wait_s)) for _ in range(repeats)]
            rows = median_rows([r["steps"] for r in runs])
            final = rows[-2]  # last step (the row after it is the whole process' wall time)
            loaded = {m: all(r["loaded"][m] for r in runs) for m in runs[0]["loaded"]}
            if loaded != {m: any(r["loaded"][m] for r in runs) for m in runs[0]["loaded"]}:
                raise RuntimeError(f"{name}: the repeats imported different modules: {[r['loaded'] for r in runs]}")
            scen[name] = {"steps": rows, "rss_bytes": final["rss_bytes"], "import_s": final["t_s"],
                          "process_wall_s": rows[-1]["t_s"], "loaded": loaded}
    rss = {k: v["rss_bytes"] for k, v in scen.items()}
    fp32, nf4, idle = ("join training, fp32 plan (bnb hidden)", "join training, nf4 plan",
                       "join idle (registered, waiting)")
    over = {  # (scenario, baseline) -> bytes above the baseline
        "join idle - python": rss[idle] - rss["python"],
        "join idle - torch+transformers": rss[idle] - rss["torch+transformers"],
        "join training fp32 - torch+transformers": rss[fp32] - rss["torch+transformers"],
        "join training fp32 - model-ready": rss[fp32] - rss["torch+transformers model-ready"],
        "join training nf4 - torch+transformers": rss[nf4] - rss["torch+transformers"],
        "join training nf4 - model-ready": rss[nf4] - rss["torch+transformers model-ready"],
        "join training fp32 - (model-ready + peft, bnb hidden): our code + grpc":
            rss[fp32] - rss["+ peft (bitsandbytes hidden)"],
        "join training nf4 - (model-ready + peft + bnb): our code + grpc": rss[nf4] - rss["+ peft (with bitsandbytes)"],
    }
    return {
        "scenarios": scen,
        "overheads_bytes": over,
        "meets_target": {k: v / 1e6 <= TARGET_MB for k, v in over.items()},
        "target_mb": TARGET_MB,
        "idle_wait_s": wait_s,
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
    for col in ("scenario", "RSS MiB", "steps s", "process wall s", "imported"):
        t.add_column(col, justify="left" if col in ("scenario", "imported") else "right")
    for name, s in res["scenarios"].items():
        mods = ", ".join(m for m, on in s["loaded"].items() if on) or "-"
        t.add_row(name, _mib(s["rss_bytes"]), f"{s['import_s']:.2f}", f"{s['process_wall_s']:.2f}", mods)
    con.print(t)
    for name in ("join training, fp32 plan (bnb hidden)", "join training, nf4 plan"):
        steps = Table(title=f"{name}: where the memory goes (cumulative, one process)")
        for col in ("step", "RSS MiB", "+MiB", "t s"):
            steps.add_column(col, justify="right" if col != "step" else "left")
        prev = None
        for r in res["scenarios"][name]["steps"][:-1]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "footprint.json"))
    ap.add_argument("--idle-wait", type=float, default=6.0,
                    help="seconds the joined device heartbeats / polls before the idle reading")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench_footprint reads /proc/self/status: run it on Linux")
    res = measure(args.repeats, args.idle_wait)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
