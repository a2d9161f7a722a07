"""Peak-memory estimator for one training process running a Plan.

Predicts the PEAK RESIDENT MEMORY of the `edge-runtime train` process (on a discrete CUDA
GPU: the CUDA peak allocated). Pure functions of (ModelSpec, Plan, task); the only measured
inputs are the runtime overhead (RSS after importing torch+transformers+peft, see
`edge_runtime.measure.measure_runtime_overhead`) and the coefficients in `Calibration`,
fitted on this machine by `tools/bench_memory.py` (docs/memory.md).

Peak = overhead + weights + adapter (params, grads, optimizer) + max(phase peaks), where
the phases are: backward (saved activations + logits and their gradients), forward of a
zeroth-order step (no saved activations), and dequantization temporaries of a quantized base.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.modelspec import ModelSpec
from edge_runtime.plan import Plan

TASKS = ("classification", "causal_lm")
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5, "int4": 0.5}
# Quantization constants per weight: nf4 blockwise absmax (block 64) with double quantization
# (8-bit absmax + one fp32 per 256 blocks); int4 groups of 128 with fp32 scale+shift;
# int8 (LLM.int8 / quanto) one fp32 scale per output row (added per module, not per weight).
QUANT_CONST = {"nf4": 1 / 64 + 4 / (64 * 256), "int4": 8 / 128, "int8": 0.0}
QUANTIZED = ("int8", "nf4", "int4")
LOGIT_CHUNK_ROWS = 256  # edge_runtime.training.losses.CHUNK_TOKENS


@dataclass(frozen=True)
class Calibration:
    """Coefficients fitted against measured peaks (tools/bench_memory.py on this machine).

    Activation coefficients count saved values per token per layer, in units of the named
    dimension (x act dtype bytes). Logit coefficients count (batch, seq, vocab) fp32 copies
    alive at the peak.
    """

    act_hidden: float = 12.0        # saved values ~ act_hidden * hidden per token per layer
    act_inter: float = 4.0          # ... + act_inter * intermediate
    act_kv: float = 4.0             # ... + act_kv * kv_dim (k/v projections, rope)
    attn_eager: float = 4.0         # materialized attention: copies of (b, heads, s, s) per layer
    ckpt_hidden: float = 1.0        # gradient checkpointing keeps ckpt_hidden * hidden per token per layer
    logits_train: float = 3.0       # one checkpointed chunk in backward: logits, softmax, grad (fp32)
    logits_zo: float = 2.0          # logits + log-softmax in a no-grad forward
    fwd_transient: float = 4.0      # no-grad forward: live values ~ fwd_transient * intermediate per token
    dequant_copies: float = 2.0     # fp32 copies of the largest quantized Linear during fwd/bwd
    alloc_slack: float = 0.05       # allocator fragmentation on the dynamic part
    embed_grad_input: float = 1.0   # checkpointing + enable_input_require_grads: grad of embeddings output


DEFAULT_CALIBRATION = Calibration()


@dataclass
class MemoryEstimate:
    """total_bytes: predicted peak; breakdown: named parts that sum to total_bytes."""

    total_bytes: int
    budget_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.budget_bytes <= 0 or self.total_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": int(self.total_bytes), "budget_bytes": int(self.budget_bytes),
                "breakdown": {k: int(v) for k, v in self.breakdown.items()}}


def weight_bytes(spec: ModelSpec, precision: str, task: str, compute_dtype: str = "fp32") -> dict[str, int]:
    """Frozen base weights by part: quantizable Linear layers at `precision` (+ constants),
    embeddings / norms / untied LM head / task head at the compute dtype (never quantized)."""
    lin = spec.linear_params
    other = max(0, spec.n_params - lin)
    keep = BYTES[precision] if precision not in QUANTIZED else BYTES[compute_dtype]
    out = {"weights_linear": int(lin * BYTES[precision]), "weights_embed_norm": int(other * keep)}
    if precision in QUANTIZED:
        rows = sum(o for o, _ in spec.linear_shapes.values())
        out["quant_constants"] = int(lin * QUANT_CONST[precision] + 4 * rows)
    head = 0
    if task == "causal_lm" and not spec.tie_embeddings:
        head = spec.vocab * spec.hidden
    elif task == "classification":
        head = spec.hidden * 2 + (spec.hidden * spec.hidden + spec.hidden if spec.architecture == "bert" else 0)
    out["weights_head"] = int(head * keep)
    return out


def trainable_params(spec: ModelSpec, plan: Plan, task: str) -> int:
    """LoRA factors r*(in+out) per target (rank_pattern honoured) + a trainable task head."""
    n = 0
    for name, (o, i) in spec.target_shapes(plan.target_modules).items():
        r = next((v for k, v in plan.rank_pattern.items() if name.endswith(k)), plan.rank)
        n += r * (o + i)
    if task == "classification":
        n += spec.hidden * 2 + 2  # modules_to_save copy of the classifier
    return n


def estimate(spec: ModelSpec, plan: Plan, task: str = "classification", overhead_bytes: int | None = None,
             budget_bytes: int = 0, *, device: str = "cpu", attn_implementation: str = "sdpa",
             calibration: Calibration = DEFAULT_CALIBRATION, response_tokens: int | None = None) -> MemoryEstimate:
    """Predicted peak memory of training `spec` under `plan`; breakdown values sum to the total.

    overhead_bytes: runtime overhead (RSS after imports); None -> measured once per process
    (cached). Pass 0 for a discrete GPU's CUDA-allocated peak (`device="cuda"` does that).
    response_tokens: target (response) tokens per batch for a causal LM; None -> batch * seq_len
    (the upper bound). Only these rows go through lm_head (edge_runtime/training/losses.py).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is invalid: expected one of {TASKS}")
    spec.check_targets(plan.target_modules)
    cal = calibration
    if overhead_bytes is None:
        if device == "cuda":
            overhead_bytes = 0
        else:
            from edge_runtime.measure import measure_runtime_overhead
            overhead_bytes = measure_runtime_overhead()
    act_b = BYTES[plan.compute_dtype]
    b, s, L = plan.batch_size, plan.seq_len, spec.layers
    h, inter = spec.hidden, spec.intermediate or 4 * spec.hidden
    kv = spec.kv_heads * spec.head_dim
    tokens = b * s

    parts: dict[str, int] = {"runtime_overhead": int(overhead_bytes)}
    parts.update(weight_bytes(spec, plan.base_precision, task, plan.compute_dtype))
    n_train = trainable_params(spec, plan, task)
    parts["adapter_params"] = 4 * n_train
    zo = plan.mode == "zo"
    parts["adapter_grads"] = 0 if zo else 4 * n_train
    parts["optimizer_state"] = 0 if zo or plan.optimizer == "sgd" else 8 * n_train

    per_layer = cal.act_hidden * h + cal.act_inter * inter + cal.act_kv * kv  # values / token / layer
    # (b, heads, s, s) scores are materialized by eager attention, and by SDPA's CPU math path
    # that encoders with a padding mask take (measured: ~4 copies per BERT layer in backward).
    materialized = attn_implementation == "eager" or spec.task_kind == "encoder"
    attn = cal.attn_eager * spec.heads * s * s * b * act_b if materialized else 0.0
    # the trainer's causal-LM loss runs lm_head only on response tokens, LOGIT_CHUNK_ROWS rows at a
    # time under checkpointing: one chunk's fp32 logits (rows, V) are alive at a time
    n_resp = tokens if response_tokens is None else max(1, min(int(response_tokens), tokens))
    logits = min(n_resp, LOGIT_CHUNK_ROWS) * spec.vocab * 4 if task == "causal_lm" else 0
    dyn: dict[str, float] = {}
    if zo:
        dyn["zo_perturbation"] = 2 * 4 * n_train  # clean copy + z
        dyn["activations_forward"] = tokens * cal.fwd_transient * inter * act_b + attn / max(1.0, cal.attn_eager)
        dyn["logits"] = cal.logits_zo * logits
    else:
        if plan.gradient_checkpointing:
            kept = tokens * L * cal.ckpt_hidden * h * act_b + tokens * cal.embed_grad_input * h * 4
            dyn["activations"] = kept + tokens * per_layer * act_b + 2 * attn
        else:
            dyn["activations"] = tokens * L * per_layer * act_b + attn * L
        dyn["logits"] = cal.logits_train * logits
    if plan.base_precision in QUANTIZED and device == "cpu":
        biggest = max((o * i for o, i in spec.linear_shapes.values()), default=0)
        dyn["dequant_temporaries"] = cal.dequant_copies * biggest * 4
    dyn_total = sum(dyn.values())
    dyn["allocator_slack"] = cal.alloc_slack * dyn_total
    parts.update({k: int(v) for k, v in dyn.items()})
    total = sum(parts.values())
    return MemoryEstimate(total_bytes=int(total), budget_bytes=int(budget_bytes), breakdown=parts)


def calibration_dict(cal: Calibration = DEFAULT_CALIBRATION) -> dict[str, float]:
    return asdict(cal)
