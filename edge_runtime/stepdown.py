"""Out-of-memory step-down: when a training step runs out of memory, re-plan one rung lower and resume.

The ladder (each rung is tried only where it changes something the profile allows):

1. ``micro_batch``  halve ``batch_size`` and double ``grad_accum`` (effective batch kept)
2. ``checkpointing`` enable gradient checkpointing
3. ``rank``          halve the LoRA rank (the round's upload keeps the assigned rank: the
                     downloaded components beyond the new rank are frozen, see `shrink_state`)
4. ``int8``          8-bit base weights (if ``int8`` is in ``profile.precisions``)
5. ``4bit``          4-bit base weights (``nf4``, else ``int4``, as the profile allows)
6. ``zo``            zeroth-order training (no activations kept, no optimizer state)

A plan already in zeroth-order mode (planned so, or stepped down) still has two knobs: its
forward batch (``micro_batch`` halves ``batch_size``; ZO does not accumulate) and its base
weights (``int8``, then ``4bit``, as the profile allows).

`next_plan(plan, profile)` is the pure one-rung function; `step_down` applies rungs until an
estimate fits; `AdaptiveTrainer` wraps a `LocalTrainer` so that `train()` survives
`MemoryBudgetExceeded` / `torch.OutOfMemoryError`: it logs the estimator's error (predicted vs
measured peak), steps down, restarts from the last good adapter (the one the guard restored)
and returns one combined `TrainResult`; `last_events` and `plan` say what changed so the
client can report the new plan to the coordinator.
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from edge_runtime.plan import Plan
from protos.adapter import A_SUFFIX, B_SUFFIX

log = logging.getLogger(__name__)
MiB = 2**20
LADDER = ("micro_batch", "checkpointing", "rank", "seq_len", "int8", "4bit", "zo")
MIN_SEQ_LEN = 32  # the seq_len rung halves the sequence (longer texts are truncated) down to this
FLOAT_BASES = ("fp32", "bf16", "fp16")


# ----- the ladder (pure) -----------------------------------------------------------------------
def _rung(name: str, plan: Plan, precisions: Sequence[str]) -> Plan | None:
    """`plan` moved down by rung `name`, or None when the rung does not apply."""
    if plan.mode == "zo":
        if name == "micro_batch" and plan.batch_size > 1:
            return replace(plan, batch_size=plan.batch_size // 2, grad_accum=1)
        if name not in ("seq_len", "int8", "4bit"):
            return None
    if name == "micro_batch" and plan.batch_size > 1:
        b = plan.batch_size // 2
        eff = plan.batch_size * plan.grad_accum
        return replace(plan, batch_size=b, grad_accum=-(-eff // b))
    if name == "checkpointing" and not plan.gradient_checkpointing:
        return replace(plan, gradient_checkpointing=True)
    if name == "rank" and plan.rank > 1:
        r = plan.rank // 2
        return replace(plan, rank=r, rank_pattern={k: min(v, r) for k, v in plan.rank_pattern.items()})
    if name == "seq_len" and plan.seq_len > MIN_SEQ_LEN:
        return replace(plan, seq_len=max(MIN_SEQ_LEN, plan.seq_len // 2))
    if name == "int8" and plan.base_precision in FLOAT_BASES and "int8" in precisions:
        return replace(plan, base_precision="int8")
    if name == "4bit" and plan.base_precision in FLOAT_BASES + ("int8",):
        four = next((p for p in ("nf4", "int4") if p in precisions), None)
        return replace(plan, base_precision=four) if four else None
    if name == "zo":
        return replace(plan, mode="zo", grad_accum=1, gradient_checkpointing=False)
    return None


def next_rung(plan: Plan, profile: Any) -> tuple[str, Plan] | None:
    """(rung name, plan one rung lower), or None when the ladder is exhausted.

    A rung is taken only when every rung above it is exhausted (micro-batch reaches 1 first,
    then checkpointing, then rank down to 1, then the sequence length down to MIN_SEQ_LEN, then
    int8, 4-bit, zeroth-order). A ZO plan takes micro-batch, sequence length and base precision."""
    precisions = list(getattr(profile, "precisions", None) or [])
    for name in LADDER:
        p = _rung(name, plan, precisions)
        if p is not None:
            mem = {k: v for k, v in (plan.memory or {}).items() if k == "budget_bytes"}
            return name, replace(p, memory=mem, reasons=list(plan.reasons) + [f"stepped down: {name} after OOM"])
    return None


def next_plan(plan: Plan, profile: Any) -> Plan | None:
    """The plan one rung down the ladder (see module doc), or None when nothing is left."""
    r = next_rung(plan, profile)
    return r[1] if r else None


def step_down(plan: Plan, profile: Any, predict: Callable[[Plan], int] | None = None,
              limit_bytes: int | None = None) -> tuple[Plan, list[str]] | None:
    """Take rungs until `predict(plan) <= limit_bytes` (at least one rung; exactly one without
    `predict`). Returns (plan, rungs taken); when the estimate never fits, the bottom of the
    ladder (measuring beats giving up on an estimate); None only when no rung is left at all."""
    taken: list[str] = []
    cur = plan
    while True:
        r = next_rung(cur, profile)
        if r is None:
            if taken:
                log.warning("the estimator says no rung fits %.0f MiB; trying the lowest: %s",
                            (limit_bytes or 0) / MiB, "+".join(taken))
                return cur, taken
            return None
        taken.append(r[0])
        cur = r[1]
        if predict is None or limit_bytes is None or predict(cur) <= limit_bytes:
            return cur, taken


def plan_summary(p: Plan) -> dict[str, Any]:
    return {"mode": p.mode, "rank": p.rank, "base_precision": p.base_precision, "batch_size": p.batch_size,
            "grad_accum": p.grad_accum, "gradient_checkpointing": p.gradient_checkpointing}


@dataclass(frozen=True)
class EstimatorError:
    """What the estimator predicted for the plan that ran out of memory vs what was measured."""

    predicted_peak_bytes: int
    measured_peak_bytes: int
    budget_bytes: int

    @property
    def error_bytes(self) -> int:
        return self.measured_peak_bytes - self.predicted_peak_bytes

    @property
    def ratio(self) -> float:
        return self.measured_peak_bytes / self.predicted_peak_bytes if self.predicted_peak_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"predicted_peak_bytes": self.predicted_peak_bytes, "measured_peak_bytes": self.measured_peak_bytes,
                "budget_bytes": self.budget_bytes, "error_bytes": self.error_bytes, "ratio": self.ratio}


def is_oom(e: BaseException) -> bool:
    """CUDA out-of-memory or the runtime's memory guard (both are MemoryError subclasses)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return isinstance(e, MemoryError) or (oom is not None and isinstance(e, oom))


# ----- training at a lower rank inside a round at the assigned rank (pure tensor code) ------------
def shrink_state(state: Mapping[str, torch.Tensor], rank: int, scale_from: float, scale_to: float
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Split an adapter at rank R into a rank-`rank` head and a frozen tail.

    For each module, A (R, in), B (out, R): head A[:r], B[:, :r] * scale_from / scale_to (so the
    head's effective update s_r B_r A_r equals the first r components at scale s_R); tail
    module_key -> (A[r:] (R-r, in), B[:, r:] (out, R-r), scale_from). Other tensors pass through."""
    head: dict[str, torch.Tensor] = {}
    tail: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for k, v in state.items():
        if k.endswith(A_SUFFIX):
            mod = k[: -len(A_SUFFIX)]
            B = state[mod + B_SUFFIX]
            head[k] = v[:rank].clone()
            head[mod + B_SUFFIX] = (B[:, :rank] * (scale_from / scale_to)).clone()
            if v.shape[0] > rank:
                tail[mod] = (v[rank:].clone(), B[:, rank:].clone(), scale_from)
        elif not k.endswith(B_SUFFIX):
            head[k] = v.clone()
    return head, tail


def grow_state(head: Mapping[str, torch.Tensor], tail: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
               scale_from: float, scale_to: float) -> dict[str, torch.Tensor]:
    """Inverse of `shrink_state`: A = [A_r; A_tail] (R, in), B = [B_r * s_r / s_R, B_tail] (out, R)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in head.items():
        if k.endswith(A_SUFFIX):
            mod = k[: -len(A_SUFFIX)]
            B = head[mod + B_SUFFIX] * (scale_to / scale_from)
            if mod in tail:
                At, Bt, _ = tail[mod]
                v, B = torch.cat([v, At]), torch.cat([B, Bt], dim=1)
            out[k], out[mod + B_SUFFIX] = v.clone(), B.clone()
        elif not k.endswith(B_SUFFIX):
            out[k] = v.clone()
    return out


# ----- the trainer wrapper ------------------------------------------------------------------------
class AdaptiveTrainer:
    """A LocalTrainer whose `train` steps down the ladder instead of failing on out-of-memory.

    rebuild(plan) -> a fresh LocalTrainer for `plan` (used when the base precision changes);
    predict(plan) -> predicted peak bytes (the memory estimator), used to skip rungs that the
    estimator, corrected by the measured overshoot, says would not fit. It is a
    `edge_runtime.trainer_protocol.RoundTrainer`: the adapter's shape and scale, the seed pool
    and the memory budget are the inner trainer's. `plan` is the current (possibly stepped-down) plan."""

    def __init__(self, trainer: Any, profile: Any, rebuild: Callable[[Plan], Any] | None = None,
                 predict: Callable[[Plan], int] | None = None, max_stepdowns: int = 12):
        self.inner: Any = trainer  # a LocalTrainer (rank-scale and gradient checkpointing are its own)
        self.plan = trainer.plan
        self.profile, self.rebuild, self.predict = profile, rebuild, predict
        self.max_stepdowns = max_stepdowns
        self.events: list[dict[str, Any]] = []       # every step-down so far
        self.last_events: list[dict[str, Any]] = []  # those of the last train() call
        self._merges: list[Mapping[str, tuple]] = []
        self._conf: dict[str, Any] = {}
        self._sparse: tuple[int, float] = (0, 0.0)  # SLoRA's sparse delta (seed, density), re-attached on a rebuild

    # -- the inner trainer's state -----------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def lora_alpha(self) -> float:
        return self.inner.lora_alpha

    @property
    def use_rslora(self) -> bool:
        return self.inner.use_rslora

    @property
    def seed(self) -> int:
        return self.inner.seed

    @property
    def frozen(self) -> tuple[str, ...]:
        return self.inner.frozen

    @frozen.setter
    def frozen(self, value: tuple[str, ...]) -> None:
        self.inner.frozen = value

    @property
    def recipe(self) -> Any:
        return self.inner.recipe

    @recipe.setter
    def recipe(self, value: Any) -> None:
        self.inner.recipe = value

    @property
    def zo_pool_seed(self) -> int:
        return self.inner.zo_pool_seed

    @zo_pool_seed.setter
    def zo_pool_seed(self, value: int) -> None:
        self.inner.zo_pool_seed = value

    @property
    def zo_pool_size(self) -> int | None:
        return self.inner.zo_pool_size

    @zo_pool_size.setter
    def zo_pool_size(self, value: int | None) -> None:
        self.inner.zo_pool_size = value

    @property
    def memory_budget_bytes(self) -> int | None:
        return self.inner.memory_budget_bytes

    @memory_budget_bytes.setter
    def memory_budget_bytes(self, value: int | None) -> None:
        self.inner.memory_budget_bytes = value

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.inner.adapter_state()

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_adapter_state(state)

    def evaluate(self, records: Sequence[dict[str, Any]], batch_size: int = 64) -> dict[str, float]:
        return self.inner.evaluate(records, batch_size=batch_size)

    def configure(self, rank: int | None = None, lora_alpha: float | None = None, use_rslora: bool | None = None,
                  seed: int | None = None) -> None:
        self._conf = {"rank": rank, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "seed": seed}
        self.inner.configure(rank=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, seed=seed)

    def merge_base_delta(self, factors: Mapping[str, tuple]) -> None:
        self._merges.append(dict(factors))
        self.inner.merge_base_delta(factors)

    def attach_sparse(self, seed: int, density: float) -> None:
        self._sparse = (int(seed), float(density))
        self.inner.attach_sparse(seed, density)

    # -- train -------------------------------------------------------------------------------
    def train(self, records: Sequence[dict[str, Any]], steps: int, lr: float | None = None, seed: int = 0,
              progress: bool = True, checkpoint_dir: Any = None) -> Any:
        self.last_events = []
        t0 = time.perf_counter()
        state = self.inner.adapter_state()
        remaining, parts = steps, []
        while True:
            try:
                parts.append(self._train_at_plan(state, records, remaining, lr, seed, progress))
                break
            except BaseException as e:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
                if not is_oom(e):
                    raise
                partial = getattr(e, "result", None)
                if partial is not None:  # the guard restored the last good adapter (already regrown)
                    state = self.inner.adapter_state()
                    if partial.steps:
                        parts.append(partial)
                        remaining -= partial.steps
                self._step_down(e, partial)
                if remaining <= 0:
                    break
        result = _combine(parts, time.perf_counter() - t0)
        if checkpoint_dir is not None:
            self.inner.save_adapter(checkpoint_dir)
        return result

    def _train_at_plan(self, state: dict[str, torch.Tensor], records, steps: int, lr, seed: int, progress: bool):
        inner = self.inner
        R = inner.rank
        if self.plan.rank >= R:
            inner.load_adapter_state(state)
            return inner.train(records, steps, lr=lr, seed=seed, progress=progress)
        r = self.plan.rank
        alpha, rs = inner.lora_alpha, inner.use_rslora
        s_R, s_r = inner.scale(R), inner.scale(r)
        head, tail = shrink_state(state, r, s_R, s_r)
        inner.configure(rank=r, lora_alpha=alpha, use_rslora=rs, seed=self._conf.get("seed"))
        inner.load_adapter_state(head)
        inner.merge_base_delta(tail)  # the frozen tail acts through the base while the head trains
        try:
            return inner.train(records, steps, lr=lr, seed=seed, progress=progress)
        finally:
            inner.merge_base_delta({k: (A, -B, s) for k, (A, B, s) in tail.items()})
            grown = grow_state(inner.adapter_state(), tail, s_R, s_r)
            inner.configure(rank=R, lora_alpha=alpha, use_rslora=rs, seed=self._conf.get("seed"))
            inner.load_adapter_state(grown)

    def _measured_peak(self, e: BaseException) -> int:
        if hasattr(e, "peak_bytes"):
            return int(e.peak_bytes)
        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        return 0

    def _step_down(self, e: BaseException, partial: Any) -> None:
        if len(self.events) >= self.max_stepdowns:
            raise e
        old = self.plan
        # one basis for old and new plans: the estimator when we have it, else the plan's own figure
        predicted = int(self.predict(old) if self.predict else (old.memory or {}).get("total_bytes") or 0)
        budget = int(getattr(e, "budget_bytes", 0) or (old.memory or {}).get("budget_bytes") or 0)
        err = EstimatorError(predicted, self._measured_peak(e), budget)
        limit = None
        if self.predict is not None and predicted and budget:
            limit = predicted - max(0, err.measured_peak_bytes - budget)  # save at least the overshoot
        moved = step_down(old, self.profile, self.predict, limit)
        if moved is None:
            log.error("out of memory and the step-down ladder is exhausted (plan %s)", plan_summary(old))
            raise e
        new, rungs = moved
        if self.predict is not None:
            new = replace(new, memory={**new.memory, "total_bytes": int(self.predict(new))})
        log.warning("out of memory (%s): estimator predicted %.0f MiB, measured %.0f MiB (budget %.0f MiB, "
                    "error %+.0f MiB); stepping down %s: %s -> %s", type(e).__name__, predicted / MiB,
                    err.measured_peak_bytes / MiB, budget / MiB, err.error_bytes / MiB, "+".join(rungs),
                    plan_summary(old), plan_summary(new))
        ev = {"rungs": rungs, "from": plan_summary(old), "to": plan_summary(new), "error": type(e).__name__,
              "steps_done": int(getattr(partial, "steps", 0) or 0), "estimator": err.to_dict()}
        self.events.append(ev)
        self.last_events.append(ev)
        gc.collect()
        from edge_runtime.training.model_loading import malloc_trim
        malloc_trim()
        self._apply(old, new)

    def _apply(self, old: Plan, new: Plan) -> None:
        """Make the inner trainer run `new` (its own plan keeps a rank >= the assigned one)."""
        inner = self.inner
        self.plan = new
        inner_plan = replace(new, rank=max(new.rank, inner.plan.rank),
                             rank_pattern=dict(inner.plan.rank_pattern) if new.rank < inner.plan.rank else new.rank_pattern)
        if new.base_precision != old.base_precision:
            if self.rebuild is None:
                raise RuntimeError("step-down to a new base precision needs a rebuild function")
            state, rank = inner.adapter_state(), inner.rank
            conf = {**self._conf, "rank": rank, "lora_alpha": inner.lora_alpha, "use_rslora": inner.use_rslora}
            budget, pool, recipe = inner.memory_budget_bytes, (inner.zo_pool_seed, inner.zo_pool_size), inner.recipe
            frozen = inner.frozen
            self.inner = None
            del inner
            gc.collect()
            inner = self.rebuild(inner_plan)
            inner.memory_budget_bytes = budget
            inner.zo_pool_seed, inner.zo_pool_size = pool
            inner.recipe, inner.frozen = recipe, frozen
            self.inner = inner
            for m in self._merges:
                inner.merge_base_delta(m)
            inner.configure(**conf)
            inner.attach_sparse(*self._sparse)
            inner.load_adapter_state(state)
            return
        if new.gradient_checkpointing and not old.gradient_checkpointing:
            inner.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner.base.config.use_cache = False
        if old.gradient_checkpointing and not new.gradient_checkpointing and hasattr(inner.base, "gradient_checkpointing_disable"):
            inner.base.gradient_checkpointing_disable()
        inner.plan = inner_plan

    def report(self) -> dict[str, Any]:
        """What the coordinator should know after a round: the current plan and this round's step-downs."""
        return {"plan": self.plan.to_dict(), "stepdown": self.last_events} if self.last_events else {}


def _combine(parts: list[Any], seconds: float) -> Any:
    """One TrainResult for the pieces of a run interrupted by step-downs."""
    from edge_runtime.training.session import TrainResult

    if len(parts) == 1:
        return replace(parts[0], seconds=seconds)
    losses = [x for p in parts for x in p.losses]
    nan = float("nan")
    zo = [x for p in parts for x in (p.zo_pairs or [])] if any(p.zo_pairs for p in parts) else None
    return TrainResult(steps=sum(p.steps for p in parts), examples_seen=sum(p.examples_seen for p in parts),
                       loss_first=losses[0] if losses else nan, loss_last=losses[-1] if losses else nan,
                       mean_loss=sum(losses) / len(losses) if losses else nan, seconds=seconds,
                       peak_rss_bytes=max(p.peak_rss_bytes for p in parts), zo_pairs=zo,
                       zo_lr=parts[-1].zo_lr, losses=losses,
                       peak_rss_sampled_bytes=max(p.peak_rss_sampled_bytes for p in parts), stopped_early=False)


def adaptive_for_join(trainer: Any, cfg: Any, task: Any, factory: Callable[..., Any]) -> AdaptiveTrainer:
    """Wrap the join loop's trainer: rebuilds use the same factory, predictions the memory estimator
    (skipped when the model's shapes cannot be read, e.g. a custom trainer)."""
    kind = task.get("kind", "classification") if isinstance(task, dict) else str(task)
    predict = None
    try:
        from edge_runtime.memory import estimate
        from edge_runtime.modelspec import load_model_spec

        spec = load_model_spec(cfg.model)

        def predict(p: Plan) -> int:
            # the base is already loaded when a step runs out of memory: compare training peaks
            # (a GGUF source's load peak would make every rung look the same)
            return int(estimate(spec, p, kind).training_peak_bytes)
    except Exception as e:  # noqa: BLE001 - prediction is an optimisation; one rung at a time without it
        log.info("step-down without estimator (%s)", e)

    def rebuild(p: Plan) -> Any:
        # no load guard here: the old model's memory may not be back with the OS yet; `_apply` sets the
        # budget on the new trainer for its training steps
        return factory(cfg.model, p, task, memory_budget_bytes=None, seed=trainer.seed, threads=cfg.threads)

    return AdaptiveTrainer(trainer, cfg.profile, rebuild=rebuild, predict=predict)
