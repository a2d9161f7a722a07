"""Choose a training plan that fits a device's memory budget and round deadline.

Search space: mode (lora, zo) x rank {64..1} x base precision (the profile's) x targets x
seq_len x batch x gradient checkpointing. Every candidate is costed by
`edge_runtime.memory.estimate`; a plan over budget is never returned. Utility is
lexicographic: backprop (LoRA) before zeroth-order, then rank, then base precision, then
throughput within the round deadline (fits the deadline, sequence length, batch, no
recomputation, more target modules); upload precision is the most precise one whose
upload fits the uplink within a share of the deadline. A workload floor (tokens per
micro-batch, relaxed step by step when nothing fits) comes before rank, so a high rank is
not bought with a useless batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.memory import BYTES, TASKS, MemoryEstimate, estimate, load_description
from edge_runtime.modelspec import ModelSpec
from edge_runtime.plan import Plan
from edge_runtime.profile import DeviceProfile

RANKS = (64, 32, 16, 8, 4, 2, 1)
PRECISION_QUALITY = ("fp32", "bf16", "fp16", "int8", "nf4", "int4")  # best first
UPLOAD_ORDER = ("fp32", "fp16", "bf16", "int8")
UPLOAD_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
BATCHES = (16, 8, 4, 2, 1)
MIN_TOKENS = {"classification": 512, "causal_lm": 1024}  # workload floor (batch x seq) before rank trades off
PLAN_MARGIN = 0.05  # a plan keeps this fraction of its estimated model + training memory free (estimator error)
MIN_MARGIN_BYTES = 8 * 2**20  # ... and at least this (a ZO plan planned at exactly its budget measured +7 MiB)
UPLOAD_SHARE = 0.25          # the upload may take at most this share of the round deadline
TRAIN_EFFICIENCY = 0.35      # fraction of the GEMM rate a training step sustains
EXTENDED_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"], "bert": ["query", "key", "value"]}


class PlanningError(ValueError):
    """No configuration fits the device; the message says by how much and what would fit."""


@dataclass(frozen=True)
class _Cand:
    mode: str
    rank: int
    precision: str
    targets: tuple[str, ...]
    seq_len: int
    batch: int
    ckpt: bool
    peft: str = "lora"  # protos.peft_names.PEFT_TYPES (non-LoRA: rank 1, a placeholder)


def compute_dtype_for(profile: DeviceProfile, precision: str) -> str:
    """Compute dtype: a 16-bit base computes in its own dtype; otherwise 16-bit on accelerators
    that list it, fp32 on CPUs (their 16-bit GEMMs are slow and the estimator is fitted on fp32)."""
    if precision in ("bf16", "fp16"):
        return precision
    if profile.accelerator != "cpu":
        for dt in ("bf16", "fp16"):
            if dt in profile.compute_gflops and dt in profile.precisions:
                return dt
    return "fp32"


def seq_lens(spec: ModelSpec, task: str) -> list[int]:
    """Candidate sequence lengths, longest first: 128 for classification, 512 for causal LM."""
    top = 128 if task == "classification" else 512
    if spec.max_positions:
        top = min(top, spec.max_positions)
    out = [s for s in (512, 256, 128, 64) if s <= top]
    return out or [top]


def target_sets(spec: ModelSpec) -> list[tuple[str, ...]]:
    sets = [tuple(spec.default_targets)]
    ext = EXTENDED_TARGETS.get(spec.architecture)
    names = {n.rsplit(".", 1)[-1] for n in spec.linear_shapes}
    if ext and set(ext) <= names and tuple(ext) != sets[0]:
        sets.insert(0, tuple(ext))
    return sets


def step_seconds(spec: ModelSpec, profile: DeviceProfile, c: _Cand, compute_dtype: str) -> float:
    """Seconds per optimizer step: ~2N FLOPs/token forward; backward through a frozen base ~2N
    (+2N recompute with checkpointing); ZO = two forwards."""
    n = spec.n_params + (0 if spec.tie_embeddings else spec.vocab * spec.hidden)
    per_token = 4 * n if c.mode == "zo" else (6 * n if c.ckpt else 4 * n)
    gflops = profile.compute_gflops.get(compute_dtype, profile.compute_gflops["fp32"])
    return c.batch * c.seq_len * per_token / (gflops * 1e9 * TRAIN_EFFICIENCY)


def adapter_values(spec: ModelSpec, c: _Cand) -> int:
    """Values a device uploads per round (the task head excluded): LoRA factors, or the PEFT type's tensors."""
    if c.peft == "lora":
        return spec.lora_params(list(c.targets), c.rank)
    from protos.peft_names import trainable_count

    return trainable_count(c.peft, spec.architecture, spec.linear_shapes, spec.hidden, spec.layers,
                           Plan().virtual_tokens, Plan().bottleneck)


def upload_seconds(n_values: int, precision: str, profile: DeviceProfile) -> float:
    return n_values * UPLOAD_BYTES[precision] * 8 / (profile.uplink_mbps * 1e6) + profile.latency_ms / 1000


def effective_budget(profile: DeviceProfile, overhead: int) -> int:
    return profile.memory_budget_bytes + (overhead if profile.budget_excludes_runtime else 0)


def _overhead(profile: DeviceProfile, overhead_bytes: int | None) -> int:
    if profile.accelerator == "cuda" and not profile.unified_memory:
        return 0  # the budget is GPU memory: CUDA peak allocated, no host RSS
    if overhead_bytes is not None:
        return overhead_bytes
    from edge_runtime.measure import measure_runtime_overhead
    return measure_runtime_overhead()


def _plan_of(c: _Cand, compute_dtype: str, local_steps: int, upload: str = "fp32") -> Plan:
    return Plan(mode=c.mode, rank=c.rank, target_modules=list(c.targets), base_precision=c.precision, batch_size=c.batch,
                seq_len=c.seq_len, gradient_checkpointing=c.ckpt, upload_precision=upload,
                optimizer="sgd" if c.mode == "zo" else "adamw", compute_dtype=compute_dtype,
                learning_rate=1e-5 if c.mode == "zo" else 5e-4, local_steps=local_steps, peft=c.peft)


def _estimate(spec, c, task, profile, overhead, budget, local_steps) -> tuple[Plan, MemoryEstimate]:
    cd = compute_dtype_for(profile, c.precision)
    p = _plan_of(c, cd, local_steps)
    dev = "cuda" if profile.accelerator in ("cuda", "jetson") else "cpu"
    return p, estimate(spec, p, task, overhead_bytes=overhead, budget_bytes=budget, device=dev,
                       unified_memory=dev == "cuda" and profile.unified_memory)


def plan(profile: DeviceProfile, spec: ModelSpec, task: str, *, round_deadline_s: float | None = None,
         local_steps: int = 20, data_examples: int | None = None, overhead_bytes: int | None = None,
         alternatives: list[DeviceProfile] | None = None, peft: str = "lora") -> Plan:
    """Best feasible plan for `spec` on `profile`; raises PlanningError when nothing fits.

    overhead_bytes: runtime overhead to count (None: measured once, cached).
    alternatives: profiles to suggest when nothing fits (default: the repo's profiles/*.yaml).
    peft: the PEFT type to plan (protos.peft_names.PEFT_TYPES); a non-LoRA type is planned with
    backprop only, its own trainable size, at one placeholder rank (1).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is invalid: expected one of {TASKS}")
    from protos.peft_names import check_kind

    check_kind(peft, Plan().virtual_tokens, "--peft", Plan().bottleneck)
    deadline = float(round_deadline_s or profile.round_deadline_s)
    overhead = _overhead(profile, overhead_bytes)
    budget = effective_budget(profile, overhead)
    precisions = [p for p in PRECISION_QUALITY if p in profile.precisions]
    batches = [b for b in BATCHES if not data_examples or b <= max(1, data_examples)]
    seqs = seq_lens(spec, task)
    reasons = [f"memory budget {_gib(budget)} ({profile.name}: {_gib(profile.memory_budget_bytes)}"
               + (f" + runtime overhead {_gib(overhead)}" if profile.budget_excludes_runtime else
                  f", runtime overhead {_gib(overhead)} counted inside it") + ")"]
    smallest: dict[str, int] = {}
    smallest_est: dict[str, MemoryEstimate] = {}
    floor0 = MIN_TOKENS[task]
    lora = peft == "lora"
    for mode in ("lora", "zo") if lora else ("lora",):
        for floor in (floor0, floor0 // 2, floor0 // 4, 1):
            for rank in [r for r in RANKS if not profile.max_rank or r <= profile.max_rank] if lora else [1]:
                for prec in precisions:
                    if not _can_fit(spec, mode, prec, task, profile, overhead, budget, smallest, smallest_est, peft):
                        continue
                    feas = []
                    for targets in target_sets(spec) if lora else [tuple(spec.default_targets)]:
                        for seq in seqs:
                            for batch in batches:
                                if batch * seq < floor:
                                    continue
                                for ckpt in ((False,) if mode == "zo" else (False, True)):
                                    c = _Cand(mode, rank, prec, targets, seq, batch, ckpt, peft)
                                    p, est = _estimate(spec, c, task, profile, overhead, budget, local_steps)
                                    key = f"{mode}:{prec}"
                                    smallest[key] = min(smallest.get(key, est.total_bytes), est.total_bytes)
                                    if _fits(est):
                                        feas.append((c, p, est))
                    if feas:
                        if floor < floor0:
                            reasons.append(f"tokens per micro-batch relaxed to >= {floor} (no plan fits with >= {floor0})")
                        return _finish(feas, spec, profile, task, deadline, local_steps, reasons, smallest, budget, overhead)
    raise PlanningError(_nothing_fits(spec, task, profile, budget, smallest, overhead, alternatives, smallest_est))


def _can_fit(spec, mode, prec, task, profile, overhead, budget, smallest, smallest_est=None, peft="lora") -> bool:
    """Whether the smallest candidate of (mode, precision) fits: prunes the search."""
    c = _Cand(mode, 1, prec, tuple(spec.default_targets), seq_lens(spec, task)[-1], 1, mode == "lora", peft)
    p, est = _estimate(spec, c, task, profile, overhead, budget, 1)
    key = f"{mode}:{prec}"
    smallest[key] = min(smallest.get(key, est.total_bytes), est.total_bytes)
    if smallest_est is not None and (key not in smallest_est or est.total_bytes <= smallest_est[key].total_bytes):
        smallest_est[key] = est
        est.plan = p  # type: ignore[attr-defined]  (for the explanation)
    return _fits(est)


def margin_bytes(est: MemoryEstimate) -> int:
    """Headroom a plan keeps below its budget: PLAN_MARGIN of what is estimated (everything but the
    measured runtime overhead), at least MIN_MARGIN_BYTES."""
    modelled = est.total_bytes - int(est.breakdown.get("runtime_overhead", 0))
    return max(MIN_MARGIN_BYTES, int(PLAN_MARGIN * modelled))


def _fits(est: MemoryEstimate) -> bool:
    """Within the budget less the planning margin."""
    return est.budget_bytes <= 0 or est.total_bytes + margin_bytes(est) <= est.budget_bytes


def _finish(feas, spec, profile, task, deadline, local_steps, reasons, smallest, budget, overhead) -> Plan:
    """The best feasible candidate as a Plan: upload precision, memory breakdown and reasons filled in."""
    timed = []
    for c, p, est in feas:
        t = step_seconds(spec, profile, c, p.compute_dtype) * local_steps
        timed.append((t, c, p, est))

    def up_prec(c: _Cand) -> str:
        if c.mode == "zo":
            return "fp32"  # a ZO upload is seeds and scalars
        n = adapter_values(spec, c)
        for u in UPLOAD_ORDER:
            if upload_seconds(n, u, profile) <= UPLOAD_SHARE * deadline:
                return u
        return "int8"

    def utility(item):
        t, c, p, est = item
        up = upload_seconds(adapter_values(spec, c), up_prec(c), profile) if c.mode == "lora" else 0.0
        on_time = t + up <= deadline
        return (on_time, c.seq_len if on_time else 0, c.batch if on_time else -t, not c.ckpt, len(c.targets))

    t, c, p, est = max(timed, key=utility)
    p.upload_precision = up_prec(c)
    p.memory = est.to_dict()
    p.memory["runtime_overhead_bytes"] = int(overhead)
    p.memory["budget_scope"] = "above_runtime" if profile.budget_excludes_runtime else "process"
    _reasons(reasons, spec, profile, c, p, est, t, deadline, local_steps, smallest, budget)
    p.reasons = reasons
    return p


def _reasons(reasons: list[str], spec: ModelSpec, profile: DeviceProfile, c: _Cand, p: Plan, est: MemoryEstimate,
             t: float, deadline: float, local_steps: int, smallest: dict[str, int], budget: int) -> None:
    """Append the human-readable reasons for choosing candidate `c` (plan `p`, estimate `est`)."""
    if c.mode == "zo":
        lora_min = min((v for k, v in smallest.items() if k.startswith("lora:")), default=0)
        reasons.append(f"mode zo: no backprop plan fits (smallest LoRA plan needs {_gib(lora_min)} > budget "
                       f"{_gib(budget)}); zeroth-order needs no gradients, optimizer state or saved activations")
    else:
        reasons.append("mode lora: a backprop plan fits the budget")
    if c.peft != "lora":
        reasons.append(f"peft {c.peft}: asked for (--peft); {adapter_values(spec, c)} trainable values besides the "
                       "head, so the LoRA rank does not apply (rank 1 is a placeholder)")
    elif profile.max_rank and c.rank == max(r for r in RANKS if r <= profile.max_rank):
        reasons.append(f"rank {c.rank}: the device class's rank cap (profile max_rank {profile.max_rank}) bounds its "
                       "compute and upload per round")
    elif c.rank < RANKS[0]:
        reasons.append(f"rank {c.rank}: the largest rank with a feasible plan (rank {c.rank * 2} does not fit at any precision)")
    else:
        reasons.append(f"rank {c.rank}: the largest rank considered")
    better = [q for q in PRECISION_QUALITY[:PRECISION_QUALITY.index(c.precision)] if q in profile.precisions]
    reasons.append(f"base precision {c.precision}: " + (f"{', '.join(better)} do not fit at rank {c.rank}" if better
                                                         else "the most precise this device runs"))
    reasons.append(f"targets {list(c.targets)}: " + ("the extended set fits" if len(c.targets) > len(spec.default_targets)
                                                     else f"default targets for {spec.architecture}"))
    step = step_seconds(spec, profile, c, p.compute_dtype)
    reasons.append(f"seq_len {c.seq_len}, batch {c.batch}, gradient checkpointing {'on' if c.ckpt else 'off'}: "
                   f"best throughput that fits; ~{step:.2f} s/step x {local_steps} steps = {t:.0f} s "
                   f"(deadline {deadline:.0f} s, {profile.compute_gflops.get(p.compute_dtype, profile.compute_gflops['fp32']):g} "
                   f"GFLOP/s {p.compute_dtype})" + ("" if t <= deadline else "; EXCEEDS the deadline: the fastest feasible plan"))
    if c.mode == "lora":
        n = adapter_values(spec, c)
        reasons.append(f"upload {p.upload_precision}: {n} adapter values = {n * UPLOAD_BYTES[p.upload_precision] / 1e6:.2f} MB, "
                       f"{upload_seconds(n, p.upload_precision, profile):.1f} s at {profile.uplink_mbps:g} Mbit/s "
                       f"(limit {UPLOAD_SHARE:.0%} of the deadline)")
    else:
        reasons.append("upload fp32: a ZO update is (seed, projected gradient) pairs, a few bytes per step")
    reasons.append(f"estimated peak {_gib(est.total_bytes)} of {_gib(budget)} ({100 * est.total_bytes / budget:.0f}%; "
                   f"{_gib(margin_bytes(est))} kept free for estimator error)"
                   + (f"; the peak is LOADING the base ({load_description(spec, p)}), training alone peaks at "
                      f"{_gib(est.training_peak_bytes)}" if est.load_bound else ""))


def _nothing_fits(spec, task, profile, budget, smallest, overhead, alternatives, smallest_est=None) -> str:
    need = min(smallest.values()) if smallest else 0
    msg = [f"no plan for {spec.architecture} ({spec.n_params / 1e6:.0f}M params, {task}) fits {profile.name}: "
           f"the smallest ({'/'.join(sorted({k.split(':')[1] for k, v in smallest.items() if v == need}))}, ZO or "
           f"rank 1, batch 1, seq {seq_lens(spec, task)[-1]}) needs {_gib(need)}, budget is {_gib(budget)}: does not fit "
           f"by {need - budget} bytes (over by {_gib(need - budget)})."]
    best = min((smallest_est or {}).values(), key=lambda e: e.total_bytes, default=None)
    if best is not None and best.load_bound:
        lean_key, lean = min(smallest_est.items(), key=lambda kv: kv[1].training_peak_bytes)
        msg.append(f"That peak is the LOAD peak, not training: {load_description(spec, best.plan)} peaks at "
                   f"{_gib(best.load_peak_bytes)} before training starts (the leanest plan, {lean_key.replace(':', ' ')}, "
                   f"would need only {_gib(lean.training_peak_bytes)} once loaded); no rank, batch, sequence "
                   "length, mode or base precision lowers it.")
    # quantizations the device does not list
    fits_q = []
    for prec in PRECISION_QUALITY:
        if prec in profile.precisions:
            continue
        for mode in ("lora", "zo"):
            c = _Cand(mode, 1, prec, tuple(spec.default_targets), seq_lens(spec, task)[-1], 1, mode == "lora")
            _, est = _estimate(spec, c, task, profile, overhead, budget, 1)
            if _fits(est):
                fits_q.append(f"{prec} ({mode}, {_gib(est.total_bytes)})")
                break
    if fits_q:
        msg.append(f"It would fit with a base precision this device does not list: {', '.join(fits_q)}.")
    else:
        msg.append("No quantization of the base makes it fit.")
    if alternatives is None:
        alternatives = _repo_profiles()
    ok = []
    for prof in alternatives:
        ov = _overhead(prof, overhead)
        b = effective_budget(prof, ov)
        lowest = [q for q in PRECISION_QUALITY if q in prof.precisions][-1]
        c = _Cand("zo", 1, lowest, tuple(spec.default_targets), seq_lens(spec, task)[-1], 1, False)
        if _fits(_estimate(spec, c, task, prof, ov, b, 1)[1]):
            ok.append(prof.name)
    if ok:
        msg.append(f"Devices whose profile fits: {', '.join(ok[:6])}.")
    return " ".join(msg)


def _repo_profiles() -> list[DeviceProfile]:
    from edge_runtime.profile import ProfileError, load_profile
    d = Path(__file__).resolve().parents[1] / "profiles"
    out = []
    for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
        try:
            out.append(load_profile(f))
        except ProfileError:
            continue
    return sorted(out, key=lambda p: p.memory_budget_bytes)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


__all__ = ["plan", "PlanningError", "RANKS", "compute_dtype_for", "step_seconds", "upload_seconds", "BYTES"]
