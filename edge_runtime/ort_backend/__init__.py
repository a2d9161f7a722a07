"""On-device training backend on onnxruntime-training (no PyTorch needed at training time).

`export_artifacts` (torch + peft + onnx) turns a LoRA model into ORT training artifacts;
`OrtTrainer` (onnxruntime-training + numpy) trains the adapter and reads it back in the
torch backend's adapter-state format; `ort_memory_bytes` estimates the peak RSS of that
process. Install with `pip install .[ort]` (onnxruntime-training==1.19.2, onnx==1.17.0;
never plain onnxruntime beside it). Nothing here imports torch or onnxruntime at import time.
"""
from __future__ import annotations

from typing import Any

from ._deps import OrtBackendError, ort_available, require_ort_training
from .memory import OrtMemoryEstimate, ort_memory_bytes, ort_memory_estimate

__all__ = ["OrtBackendError", "ort_available", "require_ort_training", "OrtMemoryEstimate", "ort_memory_bytes",
           "ort_memory_estimate", "OrtTrainer", "export_artifacts", "add_lora", "AdamWConfig", "LoraSpec"]

_LAZY = {"OrtTrainer": ".trainer", "load_meta": ".trainer", "export_artifacts": ".export",
         "add_lora": ".export", "AdamWConfig": ".export", "LoraSpec": ".export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
