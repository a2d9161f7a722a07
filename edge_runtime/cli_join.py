"""`edge-runtime join HOST:PORT --profile P.yaml --model M --data D`: federated participation."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("join", help="join a federation: train rounds for a coordinator")
    p.add_argument("target", metavar="HOST:PORT", help="coordinator address")
    p.add_argument("--profile", required=True, help="device profile YAML (profiles/*.yaml or from `profile`)")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="this device's private data (JSONL/CSV/TSV)")
    p.add_argument("--plan", default=None, help="plan JSON (default: plan under the profile)")
    p.add_argument("--task", choices=("classification", "causal_lm"), default="classification",
                   help="task used for planning (the coordinator's task wins for training)")
    p.add_argument("--state-dir", default=None, help="keeps the device name and a per-round log")
    p.add_argument("--name", default="", help="device name (default: profile name + random suffix)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC (loopback / trusted networks only)")
    p.add_argument("--root-ca", default=None, help="CA certificate to verify the coordinator (TLS)")
    p.add_argument("--client-cert", default=None)
    p.add_argument("--client-key", default=None)
    p.add_argument("--enrolment-token", default="", help="from `edge-coordinator enrol` (closed enrolment)")
    p.add_argument("--retry-attempts", type=int, default=8,
                   help="tries per call on UNAVAILABLE / DEADLINE_EXCEEDED (exponential backoff with jitter)")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="use at most this many local records")
    p.add_argument("--holdout-data", default=None,
                   help="this device's held-out rows: its model is evaluated on them after each round's training and "
                        "the accuracy reported (with a personal adapter, e.g. feddpa: the personalized accuracy)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--uplink-mbps", type=float, default=None, help="shape uploads to this rate (emulation)")
    p.add_argument("--downlink-mbps", type=float, default=None, help="shape downloads to this rate (emulation)")
    p.add_argument("--emulate", action="store_true",
                   help="enforce the profile's limits on this machine: hard memory cap (cgroup/RLIMIT), compute "
                        "slowed to its GFLOP/s, bandwidth/latency shaping, availability and dropout")
    p.add_argument("--offline-s", type=float, default=30.0,
                   help="--emulate: how long an offline or dropped-out device stays silent")
    p.add_argument("--host-gflops", type=float, default=None,
                   help="fp32 GFLOP/s of one thread of this host for --emulate (default: measured with a short GEMM)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="interface for --metrics-port (0.0.0.0 to expose)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_join)


def _credentials(args):
    if args.insecure:
        logging.getLogger("edge_runtime.join").warning(
            "PLAINTEXT gRPC (--insecure): the device token and updates travel unencrypted; use --root-ca outside "
            "loopback or a trusted network")
        return None
    import grpc

    if not args.root_ca:
        raise ValueError("join needs --root-ca CA.pem for TLS, or --insecure for plaintext on a trusted network")
    chain = key = None
    if args.client_cert or args.client_key:
        if not (args.client_cert and args.client_key):
            raise ValueError("mutual TLS needs both --client-cert and --client-key")
        chain, key = Path(args.client_cert).read_bytes(), Path(args.client_key).read_bytes()
    return grpc.ssl_channel_credentials(Path(args.root_ca).read_bytes(), key, chain)


def _plan(args, profile):
    from edge_runtime.plan import Plan

    if args.plan:  # the model loads at the first task; fail now, not then, on a wrong path
        if not Path(args.model).exists():
            raise ValueError(f"model path {args.model} does not exist: give a Hugging Face model directory, "
                             "a directory with a config.json, or a .gguf file")
        return Plan.load(args.plan)
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.planner import plan

    return plan(profile, load_model_spec(args.model), args.task)


def _emulation(args, profile, plan) -> dict:
    """Limits of an emulated device, enforced in this process (see edge_runtime.emulation)."""
    from edge_runtime.client import guard_budget
    from edge_runtime.emulation import AvailabilityModel, ComputePacer, DeviceEmulation, ShapedLink, apply_memory_cap

    log = logging.getLogger("edge_runtime.emulation")
    budget = guard_budget(plan, profile)
    # hard backstop above the runtime's own guard (which stops training cleanly at `budget`)
    from edge_runtime.training.guard import hard_cap_bytes, load_limit_bytes

    log.info("memory: guard at %.0f MiB (model load: %.0f MiB); hard cap %s", budget / 2**20,
             load_limit_bytes(budget) / 2**20, apply_memory_cap(hard_cap_bytes(budget), profile.name))
    host = args.host_gflops
    if host is None:
        from edge_runtime.measure import single_thread_gflops
        host = single_thread_gflops()
    pacer = ComputePacer(device_gflops=profile.compute_gflops["fp32"], host_gflops=host)
    log.info("compute: %s at %.1f GFLOP/s on a %.1f GFLOP/s host -> x%.2f slower", profile.name,
             profile.compute_gflops["fp32"], host, pacer.factor)
    seed = sum(map(ord, args.name or profile.name))
    return {"up": ShapedLink(profile.uplink_mbps, profile.latency_ms),
            "down": ShapedLink(profile.downlink_mbps, profile.latency_ms),
            "emulation": DeviceEmulation(pace=pacer.pace, offline_s=args.offline_s,
                                         availability=AvailabilityModel(profile.availability, profile.dropout,
                                                                        seed).decide)}


def cmd_join(args) -> int:
    from edge_runtime.client import JoinConfig, run_join
    from edge_runtime.data import load_records
    from edge_runtime.profile import load_profile
    from protos.wire import TokenBucket

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    profile = load_profile(args.profile)
    plan = _plan(args, profile)
    records = load_records(args.data)[: args.limit] if args.limit else load_records(args.data)
    up = TokenBucket(args.uplink_mbps * 1e6 / 8) if args.uplink_mbps else None
    down = TokenBucket(args.downlink_mbps * 1e6 / 8) if args.downlink_mbps else None
    emu = _emulation(args, profile, plan) if args.emulate else {}
    up, down = up or emu.get("up"), down or emu.get("down")
    cfg = JoinConfig(target=args.target, model=args.model, plan=plan, profile=profile, records=records,
                     name=args.name, state_dir=args.state_dir, max_rounds=args.max_rounds,
                     enrolment_token=args.enrolment_token, credentials=_credentials(args), throttle_up=up,
                     throttle_down=down, threads=args.threads, emulation=emu.get("emulation"),
                     holdout=load_records(args.holdout_data) if args.holdout_data else [])
    if args.retry_attempts != cfg.retry.attempts:
        from dataclasses import replace as _replace

        cfg.retry = _replace(cfg.retry, attempts=max(1, args.retry_attempts))
    if args.metrics_port:
        from edge_runtime.metrics import RuntimeMetrics

        metrics = RuntimeMetrics()
        metrics.serve(args.metrics_port, args.metrics_host)
        cfg.on_round, cfg.on_retry = metrics.observe_round, metrics.retry
    summary = run_join(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in summary["rounds"]:
            print(f"round {r['round_id']}: rank {r['rank']} {r['mode']}, train {r['train_s']:.1f}s "
                  f"loss {r['train_loss']:.4f}, up {r['upload_bytes']} B in {r['upload_s']:.2f}s, "
                  f"{'accepted' if r['accepted'] else 'rejected'}")
    return 0
