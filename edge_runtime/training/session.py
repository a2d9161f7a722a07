"""`LocalTrainer`: the device's local training session; keeps the base model loaded across rounds.

Adapter state: `dict[str, Tensor]` keyed as `peft.get_peft_model_state_dict` (adapter name
stripped), float32 CPU. `train` runs first-order LoRA (AdamW/SGD) or, when `plan.mode == "zo"`,
MeZO-style zeroth-order steps (see `zo.py`). A `MemoryGuard` watches RSS against the budget;
when it trips, the adapter is rolled back to the last completed step and
`MemoryBudgetExceeded` is raised with the partial `TrainResult` attached (`.result`).

`merge_base_delta` folds aggregated low-rank updates into the frozen base: for float bases
the Linear weight gets `W += scale * B @ A`; for quantized bases (bitsandbytes / quanto,
whose weights cannot be edited exactly) the update is kept as frozen factors and added by a
forward hook on the base layer, y += x @ A^T @ B^T (scaled), which is the same function.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.data import DEFAULT_LABEL_WORDS, classification_to_instructions, record_kind
from edge_runtime.plan import Plan
from edge_runtime.training import batching, label_prior, losses
from edge_runtime.training.guard import (LoadOutOfMemory, MemoryBudgetExceeded, MemoryGuard, load_limit_bytes,
                                         max_rss_bytes)
from edge_runtime.training.model_loading import apply_lora, load_base, resolve_task
from edge_runtime.training.zo import ZOState, zo_train
from protos import peft_types
from protos.adapter import TrainingRecipe

log = logging.getLogger(__name__)
MiB = 2**20


@dataclass
class TrainResult:
    """Outcome of one local run. peak_rss_bytes is the process peak (ru_maxrss)."""

    steps: int
    examples_seen: int
    loss_first: float
    loss_last: float
    mean_loss: float
    seconds: float
    peak_rss_bytes: int
    zo_pairs: list[tuple[int, float]] | None = None
    zo_lr: float | None = None
    losses: list[float] = field(default_factory=list)
    peak_rss_sampled_bytes: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Snapshot:
    """Last good adapter values (copied into preallocated buffers after every step)."""

    tensors: dict[str, torch.Tensor]
    step: int = 0

    @classmethod
    def of(cls, params: Mapping[str, torch.Tensor]) -> "_Snapshot":
        return cls({k: p.detach().clone() for k, p in params.items()})

    def take(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        with torch.no_grad():
            for k, p in params.items():
                self.tensors[k].copy_(p)
        self.step = step

    def restore(self, params: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.tensors[k])


def _state_key(param_name: str, adapter: str = "default") -> str:
    """peft parameter name -> get_peft_model_state_dict key (adapter name stripped)."""
    return param_name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


class LocalTrainer:
    """Holds the base model and one LoRA adapter; trains, evaluates and exchanges adapter state."""

    def __init__(self, model_src: str | Path, plan: Plan, task: Any = "classification",
                 memory_budget_bytes: int | None = None, seed: int = 0, threads: int | None = None,
                 quant_backend: str = "auto", guard_load: bool = True):
        """guard_load: watch the load against `load_limit_bytes(memory_budget_bytes)` (LoadOutOfMemory);
        off only to measure training floors below the load peak (tools/bench_memory.py)."""
        if threads:
            torch.set_num_threads(int(threads))
        self.plan = plan
        self.task = resolve_task(task)
        self.memory_budget_bytes = memory_budget_bytes
        self.seed = seed
        self.zo_pool_seed = 0
        self.zo_pool_size: int | None = None  # a round's shared pool (secure seed-scalar rounds); None: the plan's
        self.frozen: tuple[str, ...] = ()  # key suffixes not to train this round (the download's contract)
        self.recipe = TrainingRecipe()  # this round's FedProx / logit adjustment / lr factor (the download says)
        self._log_prior: torch.Tensor | None = None  # (num_labels,) log label prior of the records being trained
        self._word_prior: tuple[torch.Tensor, torch.Tensor] | None = None  # causal LM: label-word ids, log prior
        self._prox_ref: dict[str, torch.Tensor] | None = None  # trainable tensors as downloaded (FedProx)
        self.last_events: list[dict[str, Any]] = []  # no step-downs here (edge_runtime.stepdown.AdaptiveTrainer)
        self.model_src = str(model_src)
        self._enc_cache: dict[tuple, tuple] = {}
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: dict[str, Any] = {}
        self._sparse: Any = None  # SLoRA's sparse delta (edge_runtime.training.sparse.SparseDelta), if attached
        self.model: nn.Module | None = None
        self.rank = plan.rank
        limit = load_limit_bytes(memory_budget_bytes) if memory_budget_bytes and guard_load else None
        guard = MemoryGuard(limit)
        try:
            with guard:  # on the main thread a load over the limit is interrupted, elsewhere checked after
                self.base, self.tokenizer = load_base(model_src, plan, self.task, seed=seed,
                                                      quant_backend=quant_backend)
                self._head_init = {n: {k: v.detach().clone() for k, v in getattr(self.base, n).state_dict().items()}
                                   for n in ("classifier", "score")
                                   if isinstance(getattr(self.base, n, None), nn.Module)}
                self.configure(plan.rank, plan.lora_alpha, plan.use_rslora, seed)
                guard.check()
        except MemoryBudgetExceeded as e:
            raise LoadOutOfMemory(max(e.peak_bytes, guard.peak_bytes), int(limit or 0), int(memory_budget_bytes or 0),
                                  f"{Path(self.model_src).name} at {plan.base_precision}") from None
        self.load_peak_sampled_bytes = guard.peak_bytes

    # ----- adapter lifecycle -------------------------------------------------------------
    def configure(self, rank: int | None = None, lora_alpha: float | None = None, use_rslora: bool | None = None,
                  seed: int | None = None) -> None:
        """(Re)build a fresh adapter at `rank` (<= plan.rank) on the loaded base; head reset to its initial values."""
        rank = self.plan.rank if rank is None else int(rank)
        self.lora_alpha = float(self.plan.lora_alpha if lora_alpha is None else lora_alpha)
        self.use_rslora = bool(self.plan.use_rslora if use_rslora is None else use_rslora)
        seed = self.seed if seed is None else seed
        if self.model is not None:
            self.base = peft_types.unload(self.model)
            self.model = None
            for name, state in self._head_init.items():
                getattr(self.base, name).load_state_dict(state)
        self.peft = self.plan.peft  # what the adapter is (a download's contract may change the plan's)
        if self.peft == "lora":
            self.model = apply_lora(self.base, self.plan, rank, self.lora_alpha, self.use_rslora, seed)
            self._params = self._trainable()
        else:  # prompt tuning / (IA)3 / BitFit / bottleneck adapters: their tensors by name (protos.peft_types)
            self.model = peft_types.build(self.base, self.peft, self.plan.virtual_tokens, seed, self.plan.bottleneck)
            self._params = peft_types.trainable(self.model)
        self.rank = rank
        self.device = next(iter(self._params.values())).device

    def _trainable(self) -> dict[str, nn.Parameter]:
        from peft import get_peft_model_state_dict

        params = {_state_key(n): p for n, p in self.model.named_parameters() if p.requires_grad}
        expected = set(get_peft_model_state_dict(self.model))
        if set(params) != expected:
            raise RuntimeError(f"trainable parameters do not match the peft state dict: only trainable "
                               f"{sorted(set(params) - expected)[:3]}, only in state {sorted(expected - set(params))[:3]}")
        return {**params, **(self._sparse.params if self._sparse is not None else {})}

    def attach_sparse(self, seed: int, density: float) -> None:
        """SLoRA's sparse delta (protos.sparse) on every LoRA module's base layer, at zero; its values
        become adapter tensors (`<module>.sparse_delta`). Same seed and density: nothing to do; 0: removed."""
        cur = self._sparse
        if (cur is None and not density) or (cur is not None and (cur.seed, cur.density) == (int(seed), float(density))):
            return
        if cur is not None:
            cur.remove()
            self._sparse = None
        if density:
            from edge_runtime.training.sparse import SparseDelta

            mods = [k[: -len(".lora_A.weight")] for k in self._params if k.endswith(".lora_A.weight")]
            self._sparse = SparseDelta(self.model, mods, seed, density)
        self._params = self._trainable()

    def scale(self, r: int | None = None) -> float:
        r = r or self.rank
        return self.lora_alpha / (r ** 0.5 if self.use_rslora else r)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Trainable adapter tensors (LoRA factors + head), float32 CPU copies, peft keys."""
        return {k: p.detach().to("cpu", torch.float32).clone() for k, p in self._params.items()}

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the adapter from `state` (same keys and shapes as `adapter_state()`)."""
        missing = sorted(set(self._params) - set(state))
        extra = sorted(set(state) - set(self._params))
        if missing or extra:
            raise ValueError(f"adapter state does not match this adapter ({self.peft}, rank {self.rank}, targets "
                             f"{self.plan.target_modules}): missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        for k, p in self._params.items():
            v = state[k]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)} but this adapter expects "
                                 f"{tuple(p.shape)}; call configure(rank=...) with the sender's rank first")
            if not torch.isfinite(v).all():
                raise ValueError(f"adapter tensor {k} has non-finite values")
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def merge_base_delta(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Add scale * B @ A (A (r, in), B (out, r)) into the frozen base layer of each LoRA module key."""
        modules = dict(self.model.named_modules())
        for key, (A, B, scale) in factors.items():
            layer = modules.get(key)
            if layer is None or not hasattr(layer, "base_layer"):
                raise ValueError(f"merge_base_delta: {key!r} is not a LoRA module of this model "
                                 "(expected a key like '<...>.q_proj', the prefix before '.lora_A.weight')")
            base = layer.get_base_layer()
            out_f, in_f = getattr(base, "out_features", None), getattr(base, "in_features", None)
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != in_f or B.shape[0] != out_f:
                raise ValueError(f"merge_base_delta: {key}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                                 f"({out_f}, {in_f}) layer; expected A (r, {in_f}) and B ({out_f}, r)")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise ValueError(f"merge_base_delta: {key}: non-finite factors")
            self._merge_one(key, base, A.float(), B.float(), float(scale))

    def _merge_one(self, key: str, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        w = getattr(base, "weight", None)
        if type(base) is nn.Linear and isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16):
            with torch.no_grad():
                delta = (B.to(w.device) @ A.to(w.device)) * scale    # (out, in)
                w.add_(delta.to(w.dtype))
            return
        # quantized base: keep accumulated factors, add them in a forward hook
        A_old, B_old = self._deltas.get(key, (A.new_zeros((0, A.shape[1])), B.new_zeros((B.shape[0], 0))))
        self._deltas[key] = (torch.cat([A_old, A]), torch.cat([B_old, B * scale], dim=1))
        if key not in self._hooks:
            self._hooks[key] = base.register_forward_hook(self._delta_hook(key))

    def _delta_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            A, B = self._deltas[key]                                   # (R, in), (out, R)
            x = args[0]
            return output + ((x.to(A.dtype) @ A.to(x.device).T) @ B.to(x.device).T).to(output.dtype)
        return hook

    # ----- data -------------------------------------------------------------------------
    def encode(self, records: Sequence[dict[str, Any]]) -> list[batching.Example]:
        """Records -> examples for this task (classification records are cast for causal LMs).

        The last encoding is cached by the identity of the records list (a device trains on the
        same local data every round); pass a new list after changing records in place."""
        if not records:
            raise ValueError("no records to train or evaluate on")
        key = (id(records), len(records), id(records[0]), id(records[-1]), self.task, self.plan.seq_len)
        if key in self._enc_cache:
            return self._enc_cache[key][0]
        examples = self._encode(records)
        if len(self._enc_cache) >= 4:
            self._enc_cache.pop(next(iter(self._enc_cache)))
        self._enc_cache[key] = (examples, records)  # holding `records` keeps the ids in the key valid
        return examples

    def _encode(self, records: Sequence[dict[str, Any]]) -> list[batching.Example]:
        kind = record_kind(records[0])
        L = self.plan.seq_len
        if self.task.kind == "classification":
            if kind != "classification":
                raise ValueError("a classification task needs {'text','label'} records; these are instructions "
                                 "(use task 'causal_lm')")
            bad = [r["label"] for r in records if not 0 <= r["label"] < self.task.num_labels]
            if bad:
                raise ValueError(f"label {bad[0]} out of range for num_labels={self.task.num_labels}")
            return batching.encode_classification(self.tokenizer, records, L)
        if kind == "classification":
            records = classification_to_instructions(records, label_words=self.task.label_words or DEFAULT_LABEL_WORDS)
        return batching.encode_instructions(self.tokenizer, records, L)

    def _loss(self, batch: dict[str, torch.Tensor],
              first_bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.task.kind == "classification":
            return losses.classification_loss(self.model, batch)
        return losses.causal_lm_loss(self.model, batch, first_bias=first_bias)

    def _train_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: the task loss under the round's recipe (logit adjustment, FedProx)."""
        tau = self.recipe.logit_adjust
        if self._log_prior is not None:
            logits = losses.classification_logits(self.model, batch)
            loss = torch.nn.functional.cross_entropy(logits + tau * self._log_prior, batch["labels"])
        else:
            wp = self._word_prior
            loss = self._loss(batch, None if wp is None else (wp[0], tau * wp[1]))
        if self._prox_ref is not None:
            loss = loss + losses.proximal_term(self._params, self._prox_ref, self.recipe.prox_mu)
        return loss

    def _start_recipe(self, examples: Sequence[batching.Example]) -> None:
        """Label prior (logit adjustment: a classifier's logits, a causal LM's label words at the first
        response token) and the proximal reference for this call of `train`."""
        r = self.recipe
        self._log_prior = self._word_prior = None
        if r.logit_adjust > 0 and self.task.kind == "classification":
            prior = label_prior.log_prior([int(e.label) for e in examples], self.task.num_labels)
            self._log_prior = prior.to(self.device)
        elif r.logit_adjust > 0:
            words = self.task.label_words or DEFAULT_LABEL_WORDS
            wp = label_prior.response_prior(examples, self.tokenizer, words, self.plan.seq_len)
            self._word_prior = None if wp is None else (wp[0].to(self.device), wp[1].to(self.device))
        self._prox_ref = ({k: p.detach().clone() for k, p in self._params.items()} if r.prox_mu > 0 else None)

    def _collate(self, examples: Sequence[batching.Example], idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return batching.collate([examples[i] for i in idx], self.tokenizer.pad_token_id, self.device)

    # ----- training ---------------------------------------------------------------------
    def train(self, records: Sequence[dict[str, Any]], steps: int, lr: float | None = None, seed: int = 0,
              progress: bool = True, checkpoint_dir: str | Path | None = None) -> TrainResult:
        """`steps` optimizer steps (each `plan.grad_accum` micro-batches of `plan.batch_size`)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        lr = float(self.plan.learning_rate if lr is None else lr) * self.recipe.lr_scale
        examples = self.encode(records)
        self._start_recipe(examples)
        stream = batching.bucketed_batches([len(e.input_ids) for e in examples], self.plan.batch_size, seed)
        batches = (self._collate(examples, idx) for idx in stream)
        snap = _Snapshot.of(self._params)
        losses_: list[float] = []
        seen = 0
        t0 = time.perf_counter()
        guard = MemoryGuard(self.memory_budget_bytes)
        reporter = _Reporter(steps, progress, guard)
        zo_pairs = None
        try:
            with guard, reporter:
                if self.plan.mode == "zo":
                    zo_pairs, losses_ = self._train_zo(batches, steps, lr, seed, guard, reporter, snap)
                    seen = steps * self.plan.batch_size
                else:
                    seen = self._train_lora(batches, steps, lr, guard, reporter, snap, losses_)
        except MemoryBudgetExceeded as e:
            guard.disarm()
            snap.restore(self._params)
            e.result = self._result(snap.step, snap.step * self.plan.batch_size * self.plan.grad_accum,
                                    losses_[: snap.step], t0, guard, zo_pairs, lr, stopped=True)
            if checkpoint_dir is not None:
                self.save_adapter(checkpoint_dir)
            raise
        if checkpoint_dir is not None:
            self.save_adapter(checkpoint_dir)
        return self._result(steps, seen, losses_, t0, guard, zo_pairs, lr)

    def _result(self, steps: int, seen: int, losses_: list[float], t0: float, guard: MemoryGuard,
                zo_pairs: list | None, lr: float, stopped: bool = False) -> TrainResult:
        nan = float("nan")
        return TrainResult(steps=steps, examples_seen=seen, loss_first=losses_[0] if losses_ else nan,
                           loss_last=losses_[-1] if losses_ else nan,
                           mean_loss=sum(losses_) / len(losses_) if losses_ else nan,
                           seconds=time.perf_counter() - t0, peak_rss_bytes=max_rss_bytes(),
                           zo_pairs=list(zo_pairs) if zo_pairs is not None else None,
                           zo_lr=lr if self.plan.mode == "zo" else None, losses=list(losses_),
                           peak_rss_sampled_bytes=guard.peak_bytes, stopped_early=stopped)

    def _trains(self, key: str) -> bool:
        """Whether `key` trains this round: not frozen by the contract; under the recipe's
        freeze_head only the adapter (LoRA factors, prompt, (IA)3 vectors, biases; the head stays
        at what was downloaded)."""
        if any(key.endswith(f) for f in self.frozen):
            return False
        return not self.recipe.freeze_head or not peft_types.is_head_key(key)

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The plan's optimizer over the tensors that train this round; the task head at the recipe's
        head rate (a method's lr factor moves its PEFT tensors, not the head every type shares)."""
        head_lr = lr * self.recipe.head_ratio
        trains = [(k, p) for k, p in self._params.items() if self._trains(k)]
        groups = [{"params": ps, "lr": r} for ps, r in
                  (([p for k, p in trains if not peft_types.is_head_key(k)], lr),
                   ([p for k, p in trains if peft_types.is_head_key(k)], head_lr)) if ps]
        if self.plan.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        return torch.optim.SGD(groups, lr=lr)

    def _train_lora(self, batches, steps: int, lr: float, guard: MemoryGuard, reporter: "_Reporter",
                    snap: _Snapshot, losses_: list[float]) -> int:
        opt = self._optimizer(lr)
        self.model.train()
        seen = 0
        for step in range(steps):
            guard.check()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(self.plan.grad_accum):
                batch = next(batches)
                loss = self._train_loss(batch) / self.plan.grad_accum
                loss.backward()
                total += float(loss.detach())
                seen += int(batch["input_ids"].shape[0])
            if not torch.isfinite(torch.tensor(total)):
                raise FloatingPointError(f"training loss became non-finite at step {step + 1}; lower the learning rate")
            opt.step()
            losses_.append(total)
            guard.check()
            snap.take(self._params, step + 1)
            reporter.update(step + 1, total)
        for p in self._params.values():  # frozen tensors' gradients too
            p.grad = None
        return seen

    def _train_zo(self, batches, steps: int, lr: float, seed: int, guard: MemoryGuard, reporter: "_Reporter",
                  snap: _Snapshot):
        self.model.eval()
        state = ZOState.create(self.zo_pool_seed, self.zo_pool_size or self.plan.zo_seed_pool, seed)
        params = {k: p.data for k, p in self._params.items()}

        def loss_on(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            guard.check()
            return self._train_loss(batch)

        def on_step(step: int, loss: float) -> None:
            snap.take(self._params, step + 1)
            reporter.update(step + 1, loss)

        return zo_train(params, loss_on, batches, steps, lr, float(self.plan.zo_eps), state, on_step)

    # ----- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, records: Sequence[dict[str, Any]], batch_size: int = 64) -> dict[str, float]:
        """{"loss", "accuracy", "n"}; causal LM accuracy is the label-word next-token preference
        (NaN when records carry no labels)."""
        examples = self.encode(records)
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        cands = label_prior.label_candidates(examples)
        for idx in batching.eval_batches([len(e.input_ids) for e in examples], batch_size):
            batch = self._collate(examples, idx)
            if self.task.kind == "classification":
                logits = losses.classification_logits(self.model, batch)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                ls, _, preds = losses.causal_eval(self.model, batch, cands)
                loss_sum += ls
                if preds is not None:
                    gold = torch.tensor([examples[i].label for i in idx])
                    correct += int((preds == gold).sum())
            n += len(idx)
        self.model.train(was_training)
        acc = correct / n if (self.task.kind == "classification" or cands) else float("nan")
        return {"loss": loss_sum / n, "accuracy": acc, "n": n}

    def report(self) -> dict[str, Any]:
        """Nothing beyond TrainStats to tell the coordinator (a step-down wrapper reports its plan)."""
        return {}

    # ----- persistence ------------------------------------------------------------------
    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write a peft adapter dir (loadable with `PeftModel.from_pretrained(base, out_dir)`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        return out


class _Reporter:
    """Rich progress bar (steps, loss, RSS) or periodic log lines."""

    def __init__(self, steps: int, progress: bool, guard: MemoryGuard):
        self.steps, self.progress, self.guard = steps, progress, guard
        self._bar = None
        self._task = None
        self._every = max(1, steps // 10)

    def __enter__(self) -> "_Reporter":
        if self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}  rss {task.fields[rss]:.0f} MiB"),
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.steps, loss=float("nan"), rss=self.guard.peak_bytes / MiB)
        return self

    def update(self, step: int, loss: float) -> None:
        rss = self.guard.sample() / MiB
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, rss=rss)
        elif step % self._every == 0 or step == self.steps:
            log.info("step %d/%d loss %.4f rss %.0f MiB", step, self.steps, loss, rss)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
