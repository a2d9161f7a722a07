"""`CoordinatorConfig`: everything `edge-coordinator serve` configures."""
from __future__ import annotations

from dataclasses import dataclass, field

from protos import wire
from protos.task import check_label_words

from . import rounds as R
from .defences import DefenceConfig
from .methods import DEFAULT, MethodConfig, method_class
from .round_policy import RoundPolicy
from .server_opt import ServerOptConfig
from .secagg_round import SecAggSettings, check_secagg_config


@dataclass
class CoordinatorConfig:
    """Everything `edge-coordinator serve` configures. lr/zo_lr 0 = each device's plan value."""

    model: str
    store: str
    strategy: str = DEFAULT
    rounds: int = 3
    min_devices: int = 1
    fraction: float = 1.0
    quorum: float = 1.0
    round_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 120.0
    local_steps: int = 20
    zo_local_steps: int = 0  # ZO steps are cheap (two forwards); 0 = local_steps
    lr: float = 0.0
    zo_lr: float = 0.0
    max_rank: int = 8
    cap_rank: int = 64
    prune_threshold: float = 0.0  # rank self-pruning (hetlora): coordinator.methods.base.MethodConfig
    init: str = "random"  # the round-1 LoRA factors: "random" (peft), "federa" or "slora" (coordinator.init_global)
    slora_rounds: int = 0  # --init slora: sparse rounds before LoRA (coordinator.slora)
    slora_density: float = 0.0  # --init slora: share of each LoRA module's base weight entries trained in them
    lora_alpha: float = 16.0
    use_rslora: bool = False
    task: str = "classification"
    num_labels: int = 2
    label_words: list[str] = field(default_factory=list)  # causal_lm: response word per class (protos.task)
    target_modules: list[str] = field(default_factory=list)
    seed: int = 0
    eval_data: str | None = None
    eval_limit: int = 512
    enrolment_token: str = ""
    norm_bound: float = 1e4
    max_upload_bytes: int = wire.MAX_BLOB_BYTES
    poll_interval_s: float = 1.0
    open_enrolment: bool = True  # library/tests default; `serve` requires tokens unless --insecure/--open-enrolment
    robust: str = "none"  # none | trimmed_mean | median (coordinator.defences)
    clip_norm: float = 0.0  # per-device update norm clip C (0 = off)
    trim: float = 0.2  # trimmed_mean: fraction dropped at each end
    dp_noise: float = 0.0  # DP noise multiplier sigma (0 = off)
    dp_delta: float = 1e-5
    replan: bool = False  # re-fit each device's rank and local steps to the deadline every round (coordinator.replan)
    replan_margin: float = 0.8  # ... aiming at this fraction of the round timeout
    secagg: bool = False  # secure aggregation: the coordinator only learns the sum (coordinator.secagg_round)
    secagg_threshold: int = 0  # shares needed to unmask / minimum survivors; 0 = majority of the selected
    secagg_neighbours: int = 0  # SecAgg+: even k neighbours per device; 0 = complete graph
    secagg_clip: float = 8.0  # payload entries are clipped to [-clip, clip] before fixed-point encoding
    secagg_phase_timeout_s: float = 60.0  # each phase after key advertisement closes at most this long after the last
    secagg_weight_cap: int = 0  # weights are min(n, cap) / cap; 0 = local_steps x largest plan batch
    secagg_zo_pool: int = 1024  # zo strategy: the round's shared seed pool; devices send pool + 1 scalars (0: adapters)
    policy: RoundPolicy = field(default_factory=RoundPolicy)  # weights, the devices' recipe, the server optimizer

    def __post_init__(self) -> None:
        self.label_words = list(check_label_words(self.label_words, "--label-words"))
        if self.secagg_zo_pool < 0:
            raise ValueError(f"--secagg-zo-pool must be >= 0 (0: ZO devices send adapters), got {self.secagg_zo_pool}")
        if self.slora_rounds and self.slora_rounds >= self.rounds:
            raise ValueError(f"--slora-rounds {self.slora_rounds}: the sparse stage must end before the last round "
                             f"(--rounds {self.rounds}); LoRA trains in the rounds after it")
        cohorts = self.round_policy().cohorts
        if self.secagg and cohorts > 1:
            raise ValueError(f"--secagg with --cohorts {cohorts}: each round's sum would cover "
                             "one small group (and a group's sum minus the previous global is little hidden); run "
                             "secure aggregation with parallel rounds (--cohorts 1)")
        if self.secagg:
            check_secagg_config(self.strategy, self.secagg_settings(), self.min_devices, self.defence_config().active)

    def secagg_settings(self) -> SecAggSettings:
        return SecAggSettings(threshold=self.secagg_threshold, neighbours=self.secagg_neighbours or None,
                              clip=self.secagg_clip, phase_timeout_s=self.secagg_phase_timeout_s,
                              weight_cap=self.secagg_weight_cap)

    def defence_config(self) -> DefenceConfig:
        return DefenceConfig(robust=self.robust, clip_norm=self.clip_norm, trim=self.trim, dp_noise=self.dp_noise,
                             dp_delta=self.dp_delta, dp_sample_rate=self.fraction)

    def round_config(self) -> R.RoundConfig:
        return R.RoundConfig(total_rounds=self.rounds, min_devices=self.min_devices, fraction=self.fraction,
                             quorum=self.quorum, round_timeout_s=self.round_timeout_s,
                             heartbeat_timeout_s=self.heartbeat_timeout_s, max_rank=self.max_rank,
                             strategy=self.strategy, common_rank=method_class(self.strategy).common_rank,
                             seed=self.seed, cohorts=self.round_policy().cohorts)

    def round_policy(self) -> RoundPolicy:
        """The policy (a dict when read back from a store's saved config)."""
        if isinstance(self.policy, dict):
            d = dict(self.policy)
            self.policy = RoundPolicy(**{**d, "server_opt": ServerOptConfig(**d.get("server_opt", {}))})
        return self.policy.for_task(self.task, self.num_labels)

    def method_config(self) -> MethodConfig:
        return MethodConfig(name=self.strategy, max_rank=self.max_rank, lora_alpha=self.lora_alpha,
                            use_rslora=self.use_rslora, cap_rank=max(self.cap_rank, self.max_rank),
                            prune_threshold=self.prune_threshold, init=self.init, slora_rounds=self.slora_rounds,
                            slora_density=self.slora_density, slora_seed=self.seed)
