"""Peak-RSS estimate of an `OrtTrainer` process (pure arithmetic, no imports of torch/ORT).

    total = runtime + weights + adapter state + activations + logits
    runtime     RUNTIME_BYTES: python + numpy + onnxruntime-training (torch-free, 62 MiB) plus
                the training/eval/optimizer sessions (~18 MiB)
    weights     n_params * 4 B * WEIGHT_FACTOR: the ORT backend keeps the base in fp32 (the
                checkpoint is loaded once; quantized bases are not supported by this backend);
                the 7 % covers per-initializer session overhead
    adapter     trainable * 16 B: fp32 parameter + gradient + two AdamW moments
    activations ACT_FACTOR[task_kind] * 4 B * B*S*layers*(10*h + 4*ffn + 2*heads*S): every
                activation the backward needs is kept (no gradient checkpointing in ORT's
                on-device API); decoders keep more (RMSNorm/rotary/SwiGLU decompositions, causal
                mask) than encoders
    logits      LOGIT_FACTOR * 4 B * B*S*V for causal LMs: lm_head output, its shifted copy,
                log-softmax, their gradients, rounded up by ORT's CPU arena
Factors fitted on 6 measured runs (tiny..58M-param Llama, MiniLM-L6; batch 2-8, seq 64-256) on
this project's 2-core machine with tools/bench_ort.py; every run within 3 % (docs/ort_backend.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RUNTIME_BYTES = 80 * 2**20
WEIGHT_FACTOR = 1.07
ACT_FACTOR = {"causal_lm": 1.7, "encoder": 0.9}
LOGIT_FACTOR = 7.0
_SHAPE_FIELDS = ("hidden", "layers", "heads", "intermediate", "vocab", "n_params")


@dataclass
class OrtMemoryEstimate:
    """Predicted peak RSS (bytes) of the ORT training process, with its breakdown."""

    total_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _trainable(spec: Any, plan: Any) -> int:
    """Trainable parameters: spec['n_trainable'] if given, else LoRA params from ModelSpec shapes."""
    given = _get(spec, "n_trainable")
    if given is not None:
        return int(given)
    if hasattr(spec, "lora_params"):
        return int(spec.lora_params(list(_get(plan, "target_modules")), int(_get(plan, "rank"))))
    raise ValueError("ort_memory_bytes: the model numbers need 'n_trainable' (or pass an "
                     "edge_runtime.modelspec.ModelSpec and a plan with rank/target_modules)")


def ort_memory_estimate(spec: Any, plan: Any) -> OrtMemoryEstimate:
    """Estimate for a ModelSpec-like (attributes or dict: hidden, layers, heads, intermediate,
    vocab, n_params, task_kind, optional n_trainable) and a Plan-like (batch_size, seq_len,
    rank, target_modules; dict or object)."""
    missing = [f for f in _SHAPE_FIELDS if _get(spec, f) is None]
    if missing:
        raise ValueError(f"ort_memory_bytes: model numbers lack {missing}; pass a ModelSpec or a dict with {_SHAPE_FIELDS}")
    b, s = int(_get(plan, "batch_size")), int(_get(plan, "seq_len"))
    if b < 1 or s < 1:
        raise ValueError(f"ort_memory_bytes: batch_size={b} and seq_len={s} must be >= 1")
    h, n_layers, heads = int(_get(spec, "hidden")), int(_get(spec, "layers")), int(_get(spec, "heads"))
    ffn, vocab = int(_get(spec, "intermediate")), int(_get(spec, "vocab"))
    kind = _get(spec, "task_kind", "causal_lm")
    if kind not in ACT_FACTOR:
        raise ValueError(f"ort_memory_bytes: task_kind={kind!r}: expected one of {sorted(ACT_FACTOR)}")
    causal = kind == "causal_lm"
    per_token_layer = 10 * h + 4 * ffn + 2 * heads * s                      # fp32 elements kept per token/layer
    parts = {
        "runtime": RUNTIME_BYTES,
        "weights": int(int(_get(spec, "n_params")) * 4 * WEIGHT_FACTOR),
        "adapter_params_grads_optimizer": _trainable(spec, plan) * 16,
        "activations": int(ACT_FACTOR[kind] * 4 * b * s * n_layers * per_token_layer),
        "logits": int(LOGIT_FACTOR * 4 * b * s * vocab) if causal else 0,
    }
    return OrtMemoryEstimate(total_bytes=sum(parts.values()), breakdown=parts)


def ort_memory_bytes(spec: Any, plan: Any) -> int:
    """Predicted peak RSS in bytes of `OrtTrainer` training `plan` on the model `spec`."""
    return ort_memory_estimate(spec, plan).total_bytes
