"""What a round does beyond its method: how devices are weighted, how they train (the recipe sent
with every download) and how the server steps from the aggregate (coordinator.server_opt).

Label skew makes a federated model drift to the local majorities; the remedies here are the
survey's standard ones, each a user option:
- weights: a device's weight is examples ** `weight_temper` (1: by examples, 0.5: square root,
  0: uniform), at most `weight_cap` examples (0: no cap), so one large one-sided shard cannot
  dominate; x (the device's mean training loss / ln K, at most 1) ** `loss_weight` (q-FFL, Li et al.
  2020: under logit adjustment a one-sided shard's loss is near 0 — it has nothing to teach the
  class boundary — while Adam still moves its parameters by full steps, so it barely counts);
  zeroth-order devices are weighted by what they learned: x min(1, their relative
  loss decrease / the LoRA devices' mean) (`zo_progress`), so a ZO device that barely moved does
  not drag the average back to the round's start;
- the recipe (protos.adapter.TrainingRecipe): FedProx `prox_mu`, local logit adjustment
  `logit_adjust` (FedLC), the round-wise learning-rate schedule lr * `lr_decay` ** (round - 1), and
  `freeze_head` (FedBABU: the classifier head stays at its shared initialisation, only LoRA trains);
- the server optimizer (FedAvgM / FedAdam / FedYogi with a server learning rate);
- sequential cohorts (`cohorts`; Zaccone et al. 2022's FedSeq, the sequential FL of Li et al. 2023):
  a pass over the fleet is `cohorts` rounds, each round one disjoint group of the devices trains
  from the previous group's result. At the same compute per pass, an aggregate of M/cohorts devices
  is taken `cohorts` times as often: the global model takes `cohorts` x more sequential steps, the
  pass takes `cohorts` x longer. The learning-rate schedule decays per pass.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from protos.adapter import TrainingRecipe, loss_factor

from .server_opt import ServerOptConfig


FULL_TRUST = 0.25  # loss factor from which a device's update counts fully on its own (RoundPolicy.trust)


@dataclass(frozen=True)
class RoundPolicy:
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    weight_temper: float = 0.5  # defaults: what tools/bench_federated.py measured best (docs/federated.md)
    weight_cap: float = 0.0
    zo_progress: bool = True
    prox_mu: float = 0.0
    logit_adjust: float = 1.0
    lr_decay: float = 0.7  # non-IID FedAvg needs a decaying learning rate (Li et al. 2020); measured below
    freeze_head: bool = False
    loss_weight: float = 1.0  # q: weight x min(1, device loss / ln K) ** q (0: off)
    num_labels: int = 2  # K of a classification task (chance-level loss ln K); 0: not classification (no loss weight)
    cohorts: int = 1  # rounds per pass: each round trains one of `cohorts` disjoint groups (coordinator.rounds.cohort)

    def __post_init__(self) -> None:
        if not 0 <= self.weight_temper <= 1:
            raise ValueError(f"--weight-temper {self.weight_temper!r}: expected a number in [0, 1] "
                             "(1: weight by examples, 0.5: square root, 0: uniform)")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 0):
            raise ValueError(f"--weight-cap {self.weight_cap!r}: expected examples >= 0 (0: no cap)")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"--lr-decay {self.lr_decay!r}: expected a factor in (0, 1] per round")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ValueError(f"--loss-weight {self.loss_weight!r}: expected an exponent >= 0 (0: off, 1: by loss)")
        if isinstance(self.cohorts, bool) or not isinstance(self.cohorts, int) or self.cohorts < 1:
            raise ValueError(f"--cohorts {self.cohorts!r}: expected an integer >= 1 (1: every device every round)")
        if self.num_labels == 1 or self.num_labels < 0:
            raise ValueError(f"num_labels {self.num_labels!r}: expected >= 2 classes, or 0 (not classification)")
        self.recipe(1)  # validates prox_mu / logit_adjust

    @classmethod
    def plain(cls) -> RoundPolicy:
        """Weights = examples, no recipe, no server optimizer (the methods' textbook aggregation)."""
        return cls(weight_temper=1.0, zo_progress=False, logit_adjust=0.0, loss_weight=0.0)

    def recipe(self, round_id: int, lr_factor: float = 1.0) -> TrainingRecipe:
        """What every device is told to do in `round_id` (1-based); `lr_factor`: the method's
        learning-rate multiplier (`Method.lr_factor`) for its PEFT tensors; the head stays at the schedule."""
        schedule = self.lr_decay ** self.pass_of(round_id)
        return TrainingRecipe(prox_mu=self.prox_mu, logit_adjust=self.logit_adjust, lr_scale=lr_factor * schedule,
                              freeze_head=self.freeze_head, head_lr_scale=schedule if lr_factor != 1.0 else 0.0)

    def pass_of(self, round_id: int) -> int:
        """0-based pass of `round_id` (1-based): a pass is `cohorts` rounds, every device training once."""
        return max(0, round_id - 1) // self.cohorts

    def weight(self, num_examples: float, loss: float | None = None) -> float:
        """A device's aggregation weight from the examples and the mean training loss it reports."""
        n = max(1.0, float(num_examples))
        if self.weight_cap:
            n = min(n, self.weight_cap)
        return n ** self.weight_temper * self.loss_factor(loss)

    def loss_factor(self, loss: float | None) -> float:
        """min(1, loss / ln K) ** loss_weight, at least 1e-3 (1: off, or no finite loss reported)."""
        return loss_factor(loss, self.loss_weight, self.num_labels)

    def for_task(self, task: str, num_labels: int) -> RoundPolicy:
        """This policy for a federation's task (the loss weight needs a classifier's K)."""
        return replace(self, num_labels=int(num_labels) if task == "classification" else 0)

    def trust(self, loss: float | None) -> float:
        """How much a device's update is worth on its own: its loss factor / FULL_TRUST, at most 1 (a shard
        whose mean training loss is at least a quarter of chance level counts fully; a one-sided shard,
        ~0.001 of it, barely). 1 without the loss weight."""
        return min(1.0, self.loss_factor(loss) / FULL_TRUST)

    def round_step(self, trusts: Sequence[float]) -> float:
        """The round's step towards its aggregate under cohorts: the largest trust of its devices (a ZO
        device's x its progress factor), so a cohort whose every device is a one-sided shard or a
        barely-moving ZO device moves the global only that far instead of the weights' normalisation handing
        it the step. Parallel rounds (cohorts 1: the whole fleet, as secure aggregation sees it) take the
        normalised weighted mean, step 1."""
        return min(1.0, max(trusts, default=1.0)) if self.cohorts > 1 else 1.0

    @staticmethod
    def zo_factor(progress: float, reference: float | None) -> float:
        """Multiplier of a ZO device's weight: its loss progress relative to the LoRA devices' mean."""
        if reference is None or reference <= 0:
            return 1.0
        return min(1.0, max(0.01, max(0.0, progress) / reference))  # > 0: the device stays in the sum
