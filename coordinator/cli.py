"""`edge-coordinator` command line: `serve` runs a federation, `status` reads a store."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli_policy import add_policy_args, policy_from_args
from .cli_security import add_admin_commands, add_serve_args, print_status_extras, serve_config, status_extras
from .methods import DEFAULT, METHODS, NAMES
from .methods.base import INITS


def _method_args(p) -> None:
    """The method's LoRA options: ranks, rank self-pruning, the round-1 init, the LoRA scale."""
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--cap-rank", type=int, default=64, help="stack/svd: global factors kept at most at this rank")
    p.add_argument("--prune-threshold", type=float, default=0.0,
                   help="rank self-pruning (" + ", ".join(n for n, c in METHODS.items() if c.prunes_rank) + "): a "
                        "device drops trailing rank slots carrying at most this share of its B A (0: off)")
    p.add_argument("--init", choices=INITS, default="random",
                   help="round-1 LoRA factors: random (peft: A kaiming, B 0) or federa (FeDeRA: the base weights' top "
                        "singular directions, their part moved out of every base so the initial model is unchanged) "
                        "or slora (SLoRA: --slora-rounds of sparse fine-tuning, then LoRA from the SVD of its delta)")
    p.add_argument("--slora-rounds", type=int, default=0, help="--init slora: sparse rounds before LoRA (>= 1)")
    p.add_argument("--slora-density", type=float, default=0.0,
                   help="--init slora: share of each LoRA module's base weight entries trained then, e.g. 0.02")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--rslora", action="store_true")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the coordinator")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--model", required=True, help="Hugging Face model directory (base model)")
    p.add_argument("--strategy", choices=NAMES, default=DEFAULT,
                   help="aggregation method: " + "; ".join(f"{n}: {c.summary}" for n, c in METHODS.items()))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", required=True, help="directory for SQLite + safetensors state (resumed if present)")
    p.add_argument("--min-devices", type=int, default=1)
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of available devices selected per round")
    p.add_argument("--quorum", type=float, default=1.0, help="fraction of selected uploads needed to aggregate")
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds before a round's deadline")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--replan", action="store_true",
                   help="re-fit each device's rank and local steps to the round deadline every round (default off)")
    p.add_argument("--zo-local-steps", type=int, default=0, help="local steps of zeroth-order devices (0: --local-steps)")
    p.add_argument("--lr", type=float, default=0.0, help="LoRA learning rate (0: each device's plan)")
    p.add_argument("--zo-lr", type=float, default=0.0, help="zeroth-order learning rate (0: each device's plan)")
    _method_args(p)  # --max-rank, --cap-rank, --prune-threshold, --init, --slora-*, --lora-alpha, --rslora
    p.add_argument("--task", choices=("classification", "causal_lm"), default="classification")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--label-words", default="", help="causal_lm: the response word per class, comma-separated "
                   "(label k -> word k; sent to every device); default: the devices' negative,positive")
    p.add_argument("--target-modules", default="", help="comma-separated; default: the model's attention q/v")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", default=None, help="held-out data evaluated after every round")
    p.add_argument("--eval-limit", type=int, default=512)
    p.add_argument("--enrolment-token", default="")
    p.add_argument("--norm-bound", type=float, default=1e4)
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--client-ca", default=None, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation (SecAgg/SecAgg+): the coordinator only learns the sum of the updates; "
                        "linear methods only: " + ", ".join(n for n, c in METHODS.items() if c.secagg_refusal is None)
                        + " (docs/secure_aggregation.md)")
    p.add_argument("--secagg-threshold", type=int, default=0,
                   help="shares needed to unmask = minimum survivors (0: a majority of the selected devices)")
    p.add_argument("--secagg-neighbours", type=int, default=0, help="SecAgg+: even number of neighbours (0: all)")
    p.add_argument("--secagg-clip", type=float, default=8.0, help="payload values are clipped to [-clip, clip]")
    p.add_argument("--secagg-phase-timeout", type=float, default=60.0,
                   help="seconds each protocol phase after key advertisement waits for missing devices")
    p.add_argument("--secagg-weight-cap", type=int, default=0,
                   help="examples weights are capped at (0: local steps x largest plan batch)")
    p.add_argument("--secagg-zo-pool", type=int, default=1024,
                   help="zo strategy: shared seed pool; devices send pool+1 scalars instead of adapters (0: adapters)")
    add_policy_args(p)  # --server-opt, --weight-temper, --prox-mu, --logit-adjust, --lr-decay, ...
    add_serve_args(p)  # --insecure, --open-enrolment, --max-upload-bytes, --robust, --clip-norm, --dp-*
    p.add_argument("--keep-serving", action="store_true", help="do not exit after the last round")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on this port (0: off)")
    p.add_argument("--dashboard-port", type=int, default=0,
                   help="status page (/, /api/status, /metrics) on this port (0: off; may equal --metrics-port)")
    p.add_argument("--ops-host", default="127.0.0.1",
                   help="interface of the metrics/dashboard HTTP endpoints (unauthenticated; 0.0.0.0 to expose)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve)


def _credentials(args):
    from .cli_security import server_credentials

    return server_credentials(args)


def cmd_serve(args) -> int:
    from .server import serve
    from .service import Coordinator, CoordinatorConfig

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = CoordinatorConfig(
        model=args.model, store=args.store, strategy=args.strategy, rounds=args.rounds, min_devices=args.min_devices,
        fraction=args.fraction, quorum=args.quorum, round_timeout_s=args.round_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout, local_steps=args.local_steps, zo_local_steps=args.zo_local_steps, lr=args.lr, zo_lr=args.zo_lr,
        max_rank=args.max_rank, cap_rank=args.cap_rank, prune_threshold=args.prune_threshold, init=args.init,
        slora_rounds=args.slora_rounds, slora_density=args.slora_density,
        lora_alpha=args.lora_alpha, use_rslora=args.rslora,
        task=args.task, num_labels=args.num_labels, label_words=[w for w in args.label_words.split(",") if w],
        target_modules=[t for t in args.target_modules.split(",") if t], seed=args.seed, eval_data=args.eval_data,
        eval_limit=args.eval_limit, enrolment_token=args.enrolment_token, norm_bound=args.norm_bound,
        replan=getattr(args, "replan", False), secagg=args.secagg, secagg_threshold=args.secagg_threshold,
        secagg_neighbours=args.secagg_neighbours, secagg_clip=args.secagg_clip,
        secagg_phase_timeout_s=args.secagg_phase_timeout, secagg_weight_cap=args.secagg_weight_cap,
        secagg_zo_pool=args.secagg_zo_pool, policy=policy_from_args(args),
        **serve_config(args))
    creds = _credentials(args)
    from .dashboard import start_ops_servers, stop_ops_servers

    coordinator = Coordinator(cfg)
    ops = start_ops_servers(coordinator, args.ops_host, args.metrics_port, args.dashboard_port)
    try:
        serve(f"{args.host}:{args.port}", coordinator, credentials=creds, until_done=not args.keep_serving)
    finally:
        stop_ops_servers(ops)
    return 0


def cmd_status(args) -> int:
    from .store import Store

    if not (Path(args.store) / "coordinator.sqlite").exists():
        raise FileNotFoundError(f"{args.store} is not a coordinator store (no coordinator.sqlite)")
    store = Store(args.store)
    s = store.summary()
    s["initial_metrics"] = store.get_meta("initial_metrics", {})
    store.close()
    s.update(status_extras(args.store, s["rounds"]))  # refusals per reason, DP epsilon, enrolment
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    cfg = s["config"]
    con.print(f"strategy [bold]{cfg.get('strategy')}[/], {cfg.get('rounds')} rounds, model {cfg.get('model')}")
    t = Table(title="rounds")
    for col in ("round", "state", "selected", "accepted", "dropped", "late", "eval loss", "eval acc"):
        t.add_column(col)
    per_round: dict[int, int] = {}
    for u in s["updates"]:
        per_round[u["round_id"]] = per_round.get(u["round_id"], 0) + 1
    if s["initial_metrics"]:
        m = s["initial_metrics"]
        t.add_row("0", "initial", "", "", "", "", f"{m.get('loss', 0):.4f}", f"{m.get('accuracy', float('nan')):.3f}")
    for r in s["rounds"]:
        m = r["metrics"]
        t.add_row(str(r["round_id"]), r["state"], str(len(r["selected"])), str(per_round.get(r["round_id"], m.get("uploads", 0))),  # secagg rounds store no update
                  str(len(r["dropped"])), str(r["late"]), f"{m['loss']:.4f}" if "loss" in m else "-",
                  f"{m['accuracy']:.3f}" if "accuracy" in m else "-")
    con.print(t)
    d = Table(title="devices")
    for col in ("id", "name", "mode", "plan rank", "assigned rank"):
        d.add_column(col)
    for dev in s["devices"]:
        d.add_row(dev["device_id"], dev["name"], dev["mode"], str(dev["plan_rank"]), str(dev["assigned_rank"]))
    con.print(d)
    con.print(f"accepted updates: {len(s['updates'])}, bytes uploaded: {s['bytes_uploaded']}, "
              f"late uploads: {s['late_uploads']}")
    print_status_extras(con, s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-coordinator", description="Federated LoRA coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    st = sub.add_parser("status", help="summarise a coordinator store")
    st.add_argument("--store", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    add_admin_commands(sub)  # enrol, certs
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"edge-coordinator {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
