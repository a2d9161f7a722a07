"""What the device's round (edge_runtime.device_round) and the Flower client call on a trainer.

`RoundTrainer` is satisfied by `edge_runtime.training.session.LocalTrainer` and by its
out-of-memory wrapper `edge_runtime.stepdown.AdaptiveTrainer`; a custom trainer given to
`run_join` as `trainer_factory` implements the same members. Typing only: importing this
module imports neither torch nor the training stack.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from edge_runtime.plan import Plan


class TrainOutcome(Protocol):
    """What a round reads from `RoundTrainer.train` (edge_runtime.training.session.TrainResult)."""

    steps: int
    examples_seen: int
    mean_loss: float
    seconds: float
    peak_rss_bytes: int
    zo_pairs: list[tuple[int, float]] | None
    zo_lr: float | None
    losses: list[float]  # per-step training loss (the device reports its relative decrease)


@runtime_checkable
class RoundTrainer(Protocol):
    """A device's trainer as the round loop uses it.

    plan: the plan it runs (after an out-of-memory step-down, the lower one); rank / lora_alpha /
    use_rslora: the adapter's current shape and scale (set by `configure`); zo_pool_seed /
    zo_pool_size: the seed pool of a secure seed-scalar ZO round (0 / None: the plan's own);
    last_events: the step-downs of the last `train` call (empty without a step-down wrapper).
    Optional: `attach_sparse(seed, density)`, SLoRA's sparse delta on the LoRA modules' base layers
    (density 0: none; its values become adapter tensors): LocalTrainer and AdaptiveTrainer have it, a
    trainer without it refuses a download whose contract asks for one."""

    plan: Plan
    rank: int
    lora_alpha: float
    use_rslora: bool
    seed: int
    zo_pool_seed: int
    frozen: tuple[str, ...]  # key suffixes the download's contract says not to train (backprop only)
    recipe: Any  # protos.adapter.TrainingRecipe: this round's FedProx / logit adjustment / lr factor
    zo_pool_size: int | None
    memory_budget_bytes: int | None
    last_events: list[dict[str, Any]]

    def configure(self, rank: int | None = None, lora_alpha: float | None = None, use_rslora: bool | None = None,
                  seed: int | None = None) -> None:
        """A fresh adapter at `rank` with this scale (head reset)."""

    def merge_base_delta(self, factors: Mapping[str, tuple]) -> None:
        """Fold module -> (A, B, scale) low-rank updates into the frozen base."""

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable adapter tensors (LoRA factors + head), float32 CPU copies."""

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the adapter (same keys and shapes as `adapter_state()`)."""

    def train(self, records: Sequence[dict[str, Any]], steps: int, lr: float | None = None, seed: int = 0,
              progress: bool = True) -> TrainOutcome:
        """`steps` local steps on `records`."""

    def report(self) -> dict[str, Any]:
        """What the coordinator should know after a round (sent as TrainStats.extra_json; {}: nothing)."""
