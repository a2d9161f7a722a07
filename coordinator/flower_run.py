"""What a `flwr run` gives the ServerApp (optional: needs `flwr`): the run config read into our
settings, and the round journal the deployment tools read back.

- `flower_config(run_config) -> FlowerConfig`: the keys of `[tool.flwr.app.config]` in pyproject.toml
  (overridable with `flwr run . CONN --run-config 'k=v'`), including the round policy (the same
  defaults as `edge-coordinator serve`). A bad value raises ValueError naming the key and the value.
- `RoundJournal`: with run config `journal = "DIR"`, the ServerApp (in the SuperLink's process tree)
  appends one JSON line per closed round to `DIR/rounds.jsonl` (aggregate metrics, the server-side
  evaluation, every client's profile/rank/mode/examples/bytes) and, with `journal-tensors = true`,
  writes `DIR/round-N.safetensors` + `DIR/round-N.json`: what each client was sent, what it uploaded
  (ZO: its seeds and scalars) and the exported global after the round, so the round can be refolded
  outside Flower and compared (tests/test_flower_deploy.py).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.common import parameters_to_ndarrays

from coordinator.flower_strategy import FlowerConfig, HeteroLoraStrategy, export_state
from coordinator.methods import DEFAULT
from coordinator.round_policy import RoundPolicy
from coordinator.server_opt import ServerOptConfig
from protos import flower_pack as P
from protos.task import label_words_from_json

_DEFAULTS = FlowerConfig()


def _get(rc: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """run_config[key] as `kind` (default when absent); ValueError naming the key otherwise."""
    if key not in rc:
        return default
    value = rc[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config {key}={value!r}: expected {kind.__name__} (set it in pyproject.toml "
                         f"[tool.flwr.app.config] or with flwr run --run-config '{key}=...')") from None


def round_policy(rc: Mapping[str, Any]) -> RoundPolicy:
    """The round policy from the run config (RoundPolicy's defaults, as `edge-coordinator serve`)."""
    p, s = RoundPolicy(), ServerOptConfig()
    try:
        return _round_policy(rc, p, s)
    except ValueError as e:  # the checks name serve's flags: the run-config key is the flag without '--'
        raise ValueError(f"run config: {e} (run-config key = the flag without '--')") from None


def _round_policy(rc: Mapping[str, Any], p: RoundPolicy, s: ServerOptConfig) -> RoundPolicy:
    opt = ServerOptConfig(kind=_get(rc, "server-opt", str, s.kind), lr=_get(rc, "server-lr", float, s.lr),
                          beta1=_get(rc, "server-momentum", float, s.beta1),
                          beta2=_get(rc, "server-beta2", float, s.beta2), tau=_get(rc, "server-tau", float, s.tau))
    return RoundPolicy(server_opt=opt, weight_temper=_get(rc, "weight-temper", float, p.weight_temper),
                       weight_cap=_get(rc, "weight-cap", float, p.weight_cap),
                       zo_progress=_get(rc, "zo-progress", bool, p.zo_progress),
                       prox_mu=_get(rc, "prox-mu", float, p.prox_mu),
                       logit_adjust=_get(rc, "logit-adjust", float, p.logit_adjust),
                       lr_decay=_get(rc, "lr-decay", float, p.lr_decay),
                       loss_weight=_get(rc, "loss-weight", float, p.loss_weight),
                       freeze_head=_get(rc, "freeze-head", bool, p.freeze_head),
                       cohorts=_get(rc, "cohorts", int, p.cohorts))


def flower_config(rc: Mapping[str, Any]) -> FlowerConfig:
    """FlowerConfig from a run config (see pyproject.toml [tool.flwr.app.config] for the keys)."""
    d = _DEFAULTS
    min_clients = _get(rc, "min-clients", int, d.min_fit_clients)
    return FlowerConfig(strategy=_get(rc, "strategy", str, DEFAULT), max_rank=_get(rc, "max-rank", int, d.max_rank),
                        cap_rank=_get(rc, "cap-rank", int, d.cap_rank),
                        lora_alpha=_get(rc, "lora-alpha", float, d.lora_alpha),
                        local_steps=_get(rc, "local-steps", int, d.local_steps),
                        zo_local_steps=_get(rc, "zo-local-steps", int, d.zo_local_steps),
                        lr=_get(rc, "lr", float, d.lr), zo_lr=_get(rc, "zo-lr", float, d.zo_lr),
                        seed=_get(rc, "seed", int, d.seed), task=_get(rc, "task", str, d.task),
                        num_labels=_get(rc, "num-labels", int, d.num_labels),
                        label_words=label_words_from_json(_get(rc, "label-words", str, ""), "run config label-words"),
                        min_fit_clients=min_clients, min_available_clients=min_clients,
                        fraction_fit=_get(rc, "fraction-fit", float, d.fraction_fit),
                        fraction_evaluate=_get(rc, "fraction-evaluate", float, d.fraction_evaluate),
                        prune_threshold=_get(rc, "prune-threshold", float, d.prune_threshold),
                        init=_get(rc, "init", str, d.init), slora_rounds=_get(rc, "slora-rounds", int, d.slora_rounds),
                        slora_density=_get(rc, "slora-density", float, d.slora_density),
                        policy=round_policy(rc).for_task(_get(rc, "task", str, d.task),
                                                         _get(rc, "num-labels", int, d.num_labels)))


class RoundJournal:
    """Writes what each round did under `root` (see the module docstring); `tensors`: also the tensors."""

    def __init__(self, root: str | Path, tensors: bool = False) -> None:
        self.root, self.tensors = Path(root), tensors
        self.root.mkdir(parents=True, exist_ok=True)
        self.evaluations: dict[int, dict[str, Any]] = {}
        self.t0 = time.time()

    def evaluated(self, server_round: int, metrics: Mapping[str, Any]) -> None:
        """Server-side evaluation of the global after `server_round` (0: the initial global)."""
        self.evaluations[server_round] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        self._append({"round": server_round, "kind": "evaluation", **self.evaluations[server_round]})

    def round_closed(self, strategy: HeteroLoraStrategy) -> None:
        """Called by the strategy after each aggregated round (strategy.last holds the round)."""
        rec = strategy.last
        if rec is None:
            return
        clients = {}
        for cid, res in sorted(rec.results.items()):
            m = res.metrics
            sent = rec.sent[cid]
            clients[cid] = {"profile": str(m.get(P.PROP_PROFILE, "")), "rank": sent.rank, "mode": sent.mode,
                            "examples": int(res.num_examples), "train_loss": m.get("train_loss"),
                            "train_s": m.get("train_s"), "peak_rss_bytes": m.get("peak_rss_bytes"),
                            "rejected": rec.rejected.get(cid), "stepdown": json.loads(str(m.get("stepdown") or "[]")),
                            "bytes_down": sum(int(t.numel() * t.element_size()) for t in sent.tensors.values()),
                            "bytes_up": sum(len(b) for b in res.parameters.tensors)}
        self._append({"round": rec.round, "kind": "fit", "t": time.time() - self.t0,
                      **{k: v for k, v in strategy.rounds[-1].items() if k != "round"}, "clients": clients})
        if self.tensors:
            self._write_tensors(strategy)

    def _write_tensors(self, strategy: HeteroLoraStrategy) -> None:
        from safetensors.torch import save_file

        rec = strategy.last
        assert rec is not None
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"round": rec.round, "clients": {}}
        for cid, res in sorted(rec.results.items()):
            sent, m = rec.sent[cid], res.metrics
            tensors.update({f"sent/{cid}/{k}": v.contiguous() for k, v in sent.tensors.items()})
            arrays = parameters_to_ndarrays(res.parameters)
            info = {"rank": sent.rank, "mode": sent.mode, "examples": int(res.num_examples),
                    "progress": m.get("loss_progress"), "train_loss": m.get("train_loss"), "keys": m.get(P.KEYS)}
            if sent.mode == "zo":
                info["zo"] = [list(p) for p in P.arrays_to_zo(arrays, str(m[P.KEYS]))]
                info["zo_lr"] = float(m[P.ZO_LR])
            else:
                up = P.arrays_to_state(arrays, str(m[P.KEYS]))
                tensors.update({f"upload/{cid}/{k}": v.contiguous() for k, v in up.items()})
            meta["clients"][cid] = info
        tensors.update({f"global/{k}": v for k, v in export_state(strategy.global_state, strategy.method).items()})
        save_file(tensors, str(self.root / f"round-{rec.round}.safetensors"))
        (self.root / f"round-{rec.round}.json").write_text(json.dumps(meta, indent=1))

    def _append(self, row: Mapping[str, Any]) -> None:
        with open(self.root / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def read_journal(root: str | Path) -> list[dict[str, Any]]:
    """The rows of `root/rounds.jsonl` (fit rows and evaluation rows), in order; [] if none yet."""
    path = Path(root) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
