"""`edge-coordinator serve` flags of the round policy (coordinator.round_policy): server optimizer,
device weights, and the recipe every device trains with. Defaults are `RoundPolicy`'s, the settings
tools/bench_federated.py measured best (docs/federated.md)."""
from __future__ import annotations

import argparse

from .round_policy import RoundPolicy
from .server_opt import KINDS, ServerOptConfig

_P, _S = RoundPolicy(), ServerOptConfig()


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("round policy (docs/federated.md)")
    g.add_argument("--server-opt", choices=KINDS, default=_P.server_opt.kind,
                   help="server optimizer on the aggregated update: FedAvgM (avgm), FedAdam, FedYogi, or none")
    g.add_argument("--server-lr", type=float, default=_P.server_opt.lr, help="server learning rate")
    g.add_argument("--server-momentum", type=float, default=_P.server_opt.beta1, help="avgm momentum / adam beta1")
    g.add_argument("--server-beta2", type=float, default=_S.beta2, help="adam/yogi second-moment decay")
    g.add_argument("--server-tau", type=float, default=_S.tau, help="adam/yogi adaptivity")
    g.add_argument("--weight-temper", type=float, default=_P.weight_temper,
                   help="device weight = examples ** temper (1: by examples, 0.5: square root, 0: uniform)")
    g.add_argument("--weight-cap", type=float, default=_P.weight_cap, help="cap a device's examples (0: none)")
    g.add_argument("--no-zo-progress", action="store_true",
                   help="weight zeroth-order devices by examples only, not by their loss progress")
    g.add_argument("--prox-mu", type=float, default=_P.prox_mu, help="FedProx proximal term mu (0: off)")
    g.add_argument("--logit-adjust", type=float, default=_P.logit_adjust,
                   help="local logit adjustment tau by each device's label prior, classification (0: off)")
    g.add_argument("--lr-decay", type=float, default=_P.lr_decay,
                   help="pass p (1-based; a pass is --cohorts rounds) trains at lr * decay ** (p - 1)")
    g.add_argument("--cohorts", type=int, default=_P.cohorts,
                   help="sequential cohorts: each round trains one of this many disjoint device groups, a pass "
                        "of this many rounds trains every device once (1: every device every round)")
    g.add_argument("--loss-weight", type=float, default=_P.loss_weight,
                   help="device weight x min(1, its mean training loss / ln K) ** this (q-FFL; 0: off); "
                        "classification only")
    g.add_argument("--freeze-head", action="store_true",
                   help="devices train only LoRA; the classifier head stays at its shared init (FedBABU)")


def policy_from_args(args: argparse.Namespace) -> RoundPolicy:
    opt = ServerOptConfig(args.server_opt, args.server_lr, args.server_momentum, args.server_beta2, args.server_tau)
    return RoundPolicy(server_opt=opt, weight_temper=args.weight_temper, weight_cap=args.weight_cap,
                       zo_progress=not args.no_zo_progress, prox_mu=args.prox_mu, logit_adjust=args.logit_adjust,
                       lr_decay=args.lr_decay, freeze_head=args.freeze_head, loss_weight=args.loss_weight,
                       cohorts=args.cohorts)
