"""Our rank-heterogeneous LoRA aggregation as a Flower `Strategy` (optional: needs `flwr`).

`HeteroLoraStrategy` is a stateful legacy `flwr.server.strategy.Strategy` (the API Flower
1.42 runs through `ServerApp(server_fn=...)`). It keeps the global state exactly as our gRPC
coordinator does, through the same round engine (`coordinator.engine.RoundEngine`):

- configure_fit: asks each sampled client once for its properties (plan rank, mode), assigns
  `min(plan rank, max_rank)` (`coordinator.rounds.assign_rank`), and sends it the global
  adapter for that rank (`RoundEngine.download`) as arrays in sorted key order, with the keys,
  the round settings and the method's device contract in the FitIns config (`protos.flower_pack`).
- aggregate_fit: decodes each FitRes (adapter arrays, or ZO seeds + projected gradients that
  it replays from exactly what it sent), and `RoundEngine.accept` validates and folds them.
- returns the global as a self-contained adapter: per module `lora_B` with the scale folded
  in (out, r) and `lora_A` (r, in), plus the averaged head (a method that keeps B on the
  devices: A and head only).

Flower's own `Parameters` argument is ignored on the way in: the strategy's `global_state`
is the source of truth (like FedOpt keeps its moments).
"""
from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, GetPropertiesIns, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from coordinator.aggregation import GlobalState
from coordinator.defences import RoundUpload
from coordinator.engine import RoundEngine
from coordinator.init_global import initial_global
from coordinator.methods import DEFAULT, Method, MethodConfig, make_method, method_class
from coordinator.round_policy import RoundPolicy
from coordinator.rounds import EnrolmentRefused, RoundConfig, assign_rank, cohort
from coordinator.server_opt import ServerOptState
from protos import flower_pack as P
from protos.adapter import A_SUFFIX, B_SUFFIX
from protos.task import check_label_words

log = logging.getLogger("coordinator.flower")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FlowerConfig:
    """Round settings sent to every client; lr / zo_lr 0 = each device's plan value."""

    strategy: str = DEFAULT
    max_rank: int = 8
    cap_rank: int = 64
    lora_alpha: float = 16.0
    use_rslora: bool = False
    local_steps: int = 20
    zo_local_steps: int = 0  # 0 = local_steps
    lr: float = 0.0
    zo_lr: float = 0.0
    seed: int = 0
    task: str = "classification"
    num_labels: int = 2
    label_words: tuple[str, ...] = ()  # causal_lm: the response word per class (protos.task)
    fraction_fit: float = 1.0
    min_fit_clients: int = 1
    min_available_clients: int = 1
    fraction_evaluate: float = 0.0
    min_evaluate_clients: int = 1
    norm_bound: float = 1e4
    prune_threshold: float = 0.0  # rank self-pruning (hetlora): see coordinator.methods.MethodConfig
    init: str = "random"  # the round-1 factors: "random", "federa" or "slora" (coordinator.init_global)
    slora_rounds: int = 0  # init "slora": sparse rounds before LoRA
    slora_density: float = 0.0  # init "slora": share of each LoRA base weight's entries in the sparse stage
    policy: RoundPolicy = field(default_factory=RoundPolicy)  # weights, the devices' recipe, server optimizer
    properties_timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("fraction_fit", "fraction_evaluate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a fraction in [0, 1]")
        for name in ("min_fit_clients", "min_available_clients", "min_evaluate_clients", "local_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.task not in ("classification", "causal_lm"):
            raise ValueError(f"task {self.task!r}: expected 'classification' or 'causal_lm'")
        object.__setattr__(self, "label_words", check_label_words(self.label_words))

    def method_config(self) -> MethodConfig:
        return MethodConfig(name=self.strategy, max_rank=self.max_rank, lora_alpha=self.lora_alpha,
                            use_rslora=self.use_rslora, cap_rank=max(self.cap_rank, self.max_rank),
                            prune_threshold=self.prune_threshold, init=self.init, slora_rounds=self.slora_rounds,
                            slora_density=self.slora_density, slora_seed=self.seed)


@dataclass(frozen=True)
class ClientInfo:
    """What a client told us (get_properties) and what we assigned it."""

    plan_rank: int
    mode: str  # the mode it runs under this strategy ("zo" for everyone under the zo strategy)
    rank: int
    profile: str = ""


@dataclass(frozen=True)
class Sent:
    """The exact tensors one client received this round (ZO replay and upload checks need them)."""

    round: int
    rank: int
    mode: str
    tensors: State


@dataclass
class RoundRecord:
    """The last aggregated round, kept for inspection: global before, raw results, decoded uploads, what was sent."""

    round: int
    before: GlobalState
    results: dict[str, FitRes]
    uploads: list[RoundUpload]
    sent: dict[str, Sent]
    rejected: dict[str, str] = field(default_factory=dict)


class HeteroLoraStrategy(Strategy):
    """Any registered method (`coordinator.methods`) over Flower clients of different LoRA ranks.

    init_state: the round-1 adapter (peft state dict at max_rank, e.g. from
    `coordinator.model.initial_adapter_state`). evaluate_fn(global_state) -> metrics dict
    with a "loss" key, for server-side evaluation (e.g. `coordinator.model.Evaluator`).
    base_weights: the base model's state dict, needed by init "federa" (`coordinator.init_global`).
    """

    def __init__(self, init_state: Mapping[str, torch.Tensor], config: FlowerConfig | None = None,
                 evaluate_fn: Callable[[GlobalState], Mapping[str, float]] | None = None,
                 target_modules: list[str] | None = None, base_weights: Mapping[str, torch.Tensor] | None = None,
                 **overrides: Any):
        super().__init__()
        self.config = FlowerConfig(**overrides) if config is None else config
        if config is not None and overrides:
            raise ValueError("pass either config=FlowerConfig(...) or keyword settings, not both")
        self.method: Method = make_method(self.config.method_config())
        self.policy, self.opt_state = self.config.policy, ServerOptState()
        self.rcfg = RoundConfig(max_rank=self.config.max_rank, strategy=self.config.strategy,
                                common_rank=method_class(self.config.strategy).common_rank, seed=self.config.seed)
        if self.config.init == "federa" and base_weights is None:
            raise ValueError("init 'federa' starts from the SVD of the base weights: pass base_weights="
                             "model.state_dict() to HeteroLoraStrategy (server_fn does)")
        self.global_state = initial_global(self.method, init_state, base_weights or {})
        self.target_modules = list(target_modules or _targets_of(init_state))
        self.evaluate_fn = evaluate_fn
        self.clients: dict[str, ClientInfo] = {}
        self.refused: dict[str, str] = {}
        self.sent: dict[str, Sent] = {}
        self.kept: dict[str, State] = {}  # client -> what the method keeps for it on the server
        self.last: RoundRecord | None = None  # only the last round: tensors are not kept forever
        self.rounds: list[dict[str, Scalar]] = []  # per-round aggregate metrics
        self.evaluations: list[dict[str, Scalar]] = []  # per-round federated evaluation
        self.listener: Any = None  # round_closed(strategy) / evaluated(round, metrics), e.g. flower_run.RoundJournal

    def __repr__(self) -> str:
        return f"HeteroLoraStrategy(strategy={self.config.strategy!r}, max_rank={self.config.max_rank})"

    # -- parameters --------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.global_parameters()

    def global_parameters(self) -> Parameters:
        """The global as a self-contained adapter (scale folded into B), arrays in sorted key order."""
        arrays, _ = P.state_to_arrays(export_state(self.global_state, self.method))
        return ndarrays_to_parameters(arrays)

    # -- fit ---------------------------------------------------------------------------------
    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        cfg = self.config
        cohorts = self.policy.cohorts
        n = (client_manager.num_available() if cohorts > 1 else
             max(int(client_manager.num_available() * cfg.fraction_fit), cfg.min_fit_clients))
        proxies = client_manager.sample(num_clients=n, min_num_clients=cfg.min_available_clients)
        if cohorts > 1:  # this round's cohort of the sampled clients (the gRPC coordinator's rule)
            chosen = set(cohort([p.cid for p in proxies], cohorts, cfg.seed, server_round))
            proxies = [p for p in proxies if p.cid in chosen]
        self.sent = {}
        self._first_contact(proxies, server_round)
        out = []
        for proxy in sorted(proxies, key=lambda p: p.cid):
            info = self._client(proxy, server_round)
            if info is None:
                continue
            tensors = self._download(proxy.cid, info, server_round)
            self.sent[proxy.cid] = Sent(server_round, info.rank, info.mode, tensors)
            out.append((proxy, FitIns(_params(tensors)[0], self._fit_config(info, server_round, tensors))))
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        t0 = time.perf_counter()
        uploads, rejected = [], {}
        losses = []
        engine = RoundEngine(self.method, self.global_state, server_round, self.config.norm_bound, self.policy,
                             self.opt_state)
        for proxy, res in sorted(results, key=lambda r: r[0].cid):
            try:
                up = self.decode_fit(proxy.cid, res, server_round)
                progress = res.metrics.get("loss_progress")
                engine.accept(up.device_id, up.state, up.weight, self.sent[up.device_id].tensors,
                              self.sent[up.device_id].mode, progress=None if progress is None else float(progress),
                              loss=res.metrics.get("train_loss"))
                uploads.append(up)
                kept = engine.kept_from(up.state, self.sent[up.device_id].mode)
                if kept:
                    self.kept[up.device_id] = kept
                self._after_pruning(up)
                if "train_loss" in res.metrics:
                    losses.append((float(res.metrics["train_loss"]), uploads[-1].weight))
            except ValueError as e:
                rejected[proxy.cid] = str(e)
                log.warning("round %d: update from client %s rejected: %s", server_round, proxy.cid, e)
        if not uploads:
            log.warning("round %d: no valid updates (%d rejected, %d failures); global unchanged", server_round,
                        len(rejected), len(failures))
            return None, {"uploads": 0, "rejected": len(rejected), "failures": len(failures)}
        before = self.global_state
        self.global_state, _ = engine.close()
        self.last = RoundRecord(server_round, before, {p.cid: r for p, r in results}, uploads, dict(self.sent), rejected)
        metrics: dict[str, Scalar] = {"uploads": len(uploads), "rejected": len(rejected), "failures": len(failures),
                                      "zo_uploads": sum(self.sent[u.device_id].mode == "zo" for u in uploads),
                                      "aggregate_s": time.perf_counter() - t0, "strategy": self.config.strategy}
        finite = [(l, w) for l, w in losses if math.isfinite(l)]
        if finite:
            metrics["train_loss"] = sum(l * w for l, w in finite) / sum(w for _, w in finite)
        held = [float(res.metrics["holdout_accuracy"]) for _, res in results if "holdout_accuracy" in res.metrics]
        if held:  # personalized methods: each device's model (global + its own) on its held-out rows
            metrics.update(device_holdout_accuracy=sum(held) / len(held), device_holdout_n=len(held))
        self.rounds.append({"round": server_round, **metrics})
        if self.listener is not None:
            self.listener.round_closed(self)
        return self.global_parameters(), metrics

    def decode_fit(self, cid: str, res: FitRes, server_round: int) -> RoundUpload:
        """One client's final adapter state from its FitRes (ZO: replayed); ValueError if malformed."""
        sent = self.sent.get(cid)
        if sent is None or sent.round != server_round:
            raise ValueError(f"client {cid} was not sent a task in round {server_round}")
        mode = str(res.metrics.get(P.CFG_MODE, ""))
        if mode != sent.mode:
            raise ValueError(f"client {cid} answered in mode {mode!r} but was asked for {sent.mode!r}")
        keys = res.metrics.get(P.KEYS)
        if not isinstance(keys, str):
            raise ValueError(f"client {cid}: FitRes metrics lack the '{P.KEYS}' JSON list")
        arrays = parameters_to_ndarrays(res.parameters)
        if sent.mode == "zo":
            pairs = P.arrays_to_zo(arrays, keys)
            lr = float(res.metrics.get(P.ZO_LR, float("nan")))
            if not (math.isfinite(lr) and 0 < abs(lr) < 1e6):
                raise ValueError(f"client {cid}: ZO learning rate {lr!r} is not a finite non-zero number")
            state = RoundEngine.replay_zo(sent.tensors, pairs, lr)
        else:
            state = P.arrays_to_state(arrays, keys)
        return RoundUpload(device_id=cid, state=state, weight=float(max(int(res.num_examples), 1)))

    # -- evaluation --------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        cfg = self.config
        if cfg.fraction_evaluate <= 0:
            return []
        n = max(int(client_manager.num_available() * cfg.fraction_evaluate), cfg.min_evaluate_clients)
        out = []
        for proxy in sorted(client_manager.sample(num_clients=n, min_num_clients=cfg.min_evaluate_clients),
                            key=lambda p: p.cid):
            info = self._client(proxy, server_round)
            if info is None:
                continue
            tensors = self._download(proxy.cid, info, server_round + 1)
            out.append((proxy, EvaluateIns(_params(tensors)[0], self._fit_config(info, server_round, tensors))))
        return out

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        n = sum(max(r.num_examples, 1) for _, r in results)
        loss = sum(r.loss * max(r.num_examples, 1) for _, r in results) / n
        metrics: dict[str, Scalar] = {"clients": len(results)}
        acc = [(float(r.metrics["accuracy"]), max(r.num_examples, 1)) for _, r in results if "accuracy" in r.metrics]
        if acc:
            metrics["accuracy"] = sum(a * w for a, w in acc) / sum(w for _, w in acc)
        self.evaluations.append({"round": server_round, "loss": float(loss), **metrics})
        return float(loss), metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self.evaluate_fn is None:
            return None
        m = dict(self.evaluate_fn(self.global_state))
        if self.listener is not None:
            self.listener.evaluated(server_round, m)
        return float(m.get("loss", float("nan"))), {k: v for k, v in m.items() if isinstance(v, (int, float, str))}

    # -- helpers -----------------------------------------------------------------------------
    def _first_contact(self, proxies: list[ClientProxy], server_round: int) -> None:
        """Ask every new client for its properties concurrently (on a deployment each answer starts a
        ClientApp process: sequential first contact would cost a process start per client)."""
        new = [p for p in proxies if p.cid not in self.clients and p.cid not in self.refused]
        if len(new) > 1:
            with ThreadPoolExecutor(max_workers=min(len(new), 32)) as pool:
                list(pool.map(lambda p: self._client(p, server_round), new))

    def _client(self, proxy: ClientProxy, server_round: int) -> ClientInfo | None:
        """Cached client info; asks the client's properties the first time. None: refused."""
        cid = proxy.cid
        if cid in self.clients:
            return self.clients[cid]
        if cid in self.refused:
            return None
        try:
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout=self.config.properties_timeout_s,
                                       group_id=server_round)
            props = res.properties
            plan_rank, mode = int(props[P.PROP_RANK]), str(props.get(P.PROP_MODE, "lora"))
            if mode not in ("lora", "zo"):
                raise ValueError(f"plan mode {mode!r}: expected 'lora' or 'zo'")
            rank = assign_rank(plan_rank, self.rcfg)
        except (EnrolmentRefused, KeyError, ValueError, TypeError) as e:
            self.refused[cid] = str(e)
            log.warning("client %s not enrolled: %s", cid, e)
            return None
        info = ClientInfo(plan_rank=plan_rank, mode=self.method.device_mode(mode), rank=rank,
                          profile=str(props.get(P.PROP_PROFILE, "")))
        self.clients[cid] = info
        log.info("client %s (%s): plan rank %d -> assigned rank %d, mode %s", cid, info.profile, plan_rank, rank,
                 info.mode)
        return info

    def _after_pruning(self, up: RoundUpload) -> None:
        """A method whose devices prune their rank (HetLoRA): a validated upload at rank r' below the
        assigned one makes r' the client's rank from the next round on (as the gRPC coordinator does)."""
        info = self.clients.get(up.device_id)
        ranks = {int(t.shape[0]) for k, t in up.state.items() if k.endswith(A_SUFFIX)}
        if not self.method.prunes_rank or info is None or len(ranks) != 1 or min(ranks) >= info.rank:
            return
        r = min(ranks)
        log.info("client %s pruned its rank %d -> %d; assigned %d from the next round", up.device_id, info.rank, r, r)
        self.clients[up.device_id] = replace(info, plan_rank=min(info.plan_rank, r), rank=r)

    def _download(self, cid: str, info: ClientInfo, server_round: int) -> State:
        engine = RoundEngine(self.method, self.global_state, server_round)
        return engine.download(info.rank, info.mode, self.config.seed + server_round, self.kept.get(cid))

    def _fit_config(self, info: ClientInfo, server_round: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, Scalar]:
        cfg = self.config
        steps = cfg.zo_local_steps if info.mode == "zo" and cfg.zo_local_steps else cfg.local_steps
        return {P.KEYS: json.dumps(sorted(tensors)), P.CFG_STRATEGY: cfg.strategy, P.CFG_MODE: info.mode,
                P.CFG_RANK: info.rank, P.CFG_ALPHA: float(cfg.lora_alpha), P.CFG_RSLORA: bool(cfg.use_rslora),
                P.CFG_TARGETS: json.dumps(self.target_modules), P.CFG_STEPS: int(steps),
                P.CFG_LR: float(cfg.zo_lr if info.mode == "zo" else cfg.lr), P.CFG_SEED: int(cfg.seed + server_round),
                P.CFG_ROUND: int(server_round), P.CFG_TASK: cfg.task, P.CFG_LABELS: int(cfg.num_labels),
                P.CFG_LABEL_WORDS: json.dumps(list(cfg.label_words)),
                P.CFG_CONTRACT: self.method.device_contract(info.mode, server_round).to_meta(),
                P.CFG_RECIPE: self.policy.recipe(server_round, self.method.lr_factor).to_meta()}


def _params(tensors: Mapping[str, torch.Tensor]) -> tuple[Parameters, str]:
    arrays, keys = P.state_to_arrays(tensors)
    return ndarrays_to_parameters(arrays), keys


def _targets_of(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Target module names (last component of each LoRA module key), in first-seen order."""
    names: dict[str, None] = {}
    for k in state:
        if k.endswith(A_SUFFIX):
            names.setdefault(k[: -len(A_SUFFIX)].rsplit(".", 1)[-1], None)
    return list(names)


def export_state(g: GlobalState, method: Method) -> State:
    """The global as one adapter: `<module>.lora_B.weight` = B * scale (out, r), `lora_A` (r, in), + head.

    A method that keeps B on the devices has no global B: only A and the head are exported.
    """
    out: State = {}
    for name, u in g.modules.items():
        out[name + A_SUFFIX] = u.A.contiguous()
        if method.shares_b:
            out[name + B_SUFFIX] = (u.B.to(torch.float64) * u.scale).float().contiguous()
    out.update({k: v.contiguous() for k, v in g.extra.items()})
    return out


# -- deployment: `flwr run` entry point ---------------------------------------------------------
def server_fn(context: Any) -> Any:
    """ServerAppComponents from the run config (pyproject [tool.flwr.app.config] or --run-config).

    Keys (coordinator.flower_run): model (HF dir, required), strategy, num-server-rounds, max-rank, cap-rank,
    prune-threshold, init, slora-rounds, slora-density, lora-alpha, local-steps, zo-local-steps, lr, zo-lr, seed, task, num-labels, min-clients, fraction-fit,
    fraction-evaluate, eval-data, eval-limit, target-modules (JSON list), max-workers, journal, journal-tensors,
    and the round policy (serve's flags without '--': weight-temper, weight-cap, zo-progress, prox-mu,
    logit-adjust, lr-decay, freeze-head, server-opt, server-lr, server-momentum, server-beta2, server-tau).
    """
    from flwr.server import Server, ServerAppComponents, ServerConfig, SimpleClientManager

    from coordinator.flower_run import RoundJournal, flower_config
    from coordinator.model import (Evaluator, initial_adapter_state, load_base_model, load_eval_records,
                                   resolve_target_modules)

    rc = dict(context.run_config)
    if not rc.get("model"):
        raise ValueError("run config needs 'model' (a Hugging Face model directory on the SuperLink host): "
                         "flwr run . CONN --run-config 'model=\"/path/to/model\"'")
    cfg, rounds = flower_config(rc), int(rc.get("num-server-rounds", 3))
    method = make_method(cfg.method_config())  # bad method settings are named before the model loads
    if cfg.init == "slora" and cfg.slora_rounds >= rounds:
        raise ValueError(f"run config slora-rounds={cfg.slora_rounds}: the sparse stage must end before the last "
                         f"round (num-server-rounds={rounds})")
    model, tok = load_base_model(rc["model"], cfg.task, cfg.num_labels, cfg.seed)
    targets = resolve_target_modules(model, json.loads(rc["target-modules"]) if rc.get("target-modules") else None)
    init = initial_adapter_state(model, targets, cfg.max_rank, cfg.lora_alpha, cfg.use_rslora, cfg.seed,
                                 method.peft, method.virtual_tokens, method.bottleneck)  # a non-LoRA PEFT type: by name
    evaluate_fn = None
    if rc.get("eval-data"):
        ev = Evaluator(model, tok, load_eval_records(str(rc["eval-data"]), int(rc.get("eval-limit", 512))),
                       task=cfg.task)
        evaluate_fn = lambda g: ev.evaluate(method.deltas(g), g.extra, method.peft, method.virtual_tokens,  # noqa: E731
                                            method.bottleneck)
    strategy = HeteroLoraStrategy(init, cfg, evaluate_fn=evaluate_fn, target_modules=targets,
                                  base_weights=model.state_dict())
    if rc.get("journal"):
        strategy.listener = RoundJournal(str(rc["journal"]), tensors=bool(rc.get("journal-tensors", False)))
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    if int(rc.get("max-workers", 0) or 0) > 0:  # clients driven concurrently per round (Flower's thread pool)
        server.set_max_workers(int(rc["max-workers"]))
    return ServerAppComponents(server=server, config=ServerConfig(num_rounds=rounds))


def make_server_app() -> Any:
    """`flwr.server.ServerApp` running `server_fn` (what `flwr run` loads as the serverapp)."""
    from flwr.server import ServerApp

    return ServerApp(server_fn=server_fn)


app = make_server_app()
