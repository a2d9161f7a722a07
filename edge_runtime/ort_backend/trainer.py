"""On-device LoRA training with the onnxruntime-training API (no torch needed at train time).

    trainer = OrtTrainer("artifacts/")                 # Module + Optimizer + CheckpointState
    loss = trainer.train_step(input_ids, attention_mask, labels)   # numpy int64 arrays
    state = trainer.adapter_state()                    # same keys/shapes as the torch backend
    trainer.load_adapter_state(global_state)           # next round: new adapter, fresh AdamW

Batches: input_ids/attention_mask [B, S] int64; labels [B, S] int64 for causal LM (-100 =
ignored; the trainer shifts them by one like transformers) or [B] for classification.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._deps import OrtBackendError, require_ort_training

META_FILE = "ort_meta.json"
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", META_FILE)


def load_meta(artifacts_dir: str | Path) -> dict[str, Any]:
    """Read and check `ort_meta.json` and the artifact files of an export."""
    d = Path(artifacts_dir)
    missing = [f for f in ARTIFACT_FILES if not (d / f).exists()]
    if missing:
        raise OrtBackendError(f"ORT artifacts directory {d} lacks {missing}: create it with "
                              "edge_runtime.ort_backend.export_artifacts(peft_model, dir, task)")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != 1:
        raise OrtBackendError(f"{d / META_FILE}: unsupported format {meta.get('format')!r} (expected 1); re-export")
    return meta


def _as_int64(name: str, x: Any, ndim: int) -> np.ndarray:
    """Numpy (or torch) integer array -> contiguous int64 array with `ndim` dims."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x), dtype=np.int64)
    if a.ndim != ndim:
        raise ValueError(f"{name} has shape {a.shape}: expected {ndim} dimension(s)")
    return a


def _as_float32(key: str, x: Any, shape: list[int]) -> np.ndarray:
    """Numpy array or torch tensor -> contiguous float32 array of the expected shape."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if list(a.shape) != list(shape):
        raise ValueError(f"adapter tensor {key} has shape {list(a.shape)}: this export expects {shape} "
                         "(same rank and target modules as the artifacts)")
    if not np.isfinite(a).all():
        raise ValueError(f"adapter tensor {key} holds non-finite values")
    return a


class OrtTrainer:
    """Train the adapter of an exported model with onnxruntime.training.api.

    learning_rate: default the export's AdamW lr. threads: intra-op threads (default: all).
    """

    def __init__(self, artifacts_dir: str | Path, learning_rate: float | None = None,
                 threads: int | None = None):
        self._api = require_ort_training()
        self.dir = Path(artifacts_dir)
        self.meta = load_meta(self.dir)
        self.task: str = self.meta["task"]
        self.learning_rate = float(learning_rate or self.meta["optimizer"]["lr"])
        self.threads = threads
        self.steps = 0
        self._open(self._api.CheckpointState.load_checkpoint(str(self.dir / "checkpoint")))

    # ------------------------------------------------------------------ session life cycle
    def _open(self, state) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        self.state = state
        self.module = self._api.Module(str(self.dir / "training_model.onnx"), state,
                                       str(self.dir / "eval_model.onnx"), session_options=opts)
        self.optimizer = self._api.Optimizer(str(self.dir / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(self.learning_rate)

    def set_learning_rate(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate {lr!r}: expected a positive number")
        self.learning_rate = float(lr)
        self.optimizer.set_learning_rate(self.learning_rate)

    # ------------------------------------------------------------------ batches
    def _inputs(self, input_ids: Any, attention_mask: Any, labels: Any) -> list[np.ndarray]:
        ids = _as_int64("input_ids", input_ids, 2)                    # [B, S]
        mask = _as_int64("attention_mask", attention_mask, 2)          # [B, S]
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if self.task == "causal_lm":
            lab = _as_int64("labels", labels, 2)                       # [B, S]
            if lab.shape != ids.shape:
                raise ValueError(f"labels shape {lab.shape} != input_ids shape {ids.shape} (causal LM)")
            if ids.shape[1] < 2:
                raise ValueError("causal LM batches need seq_len >= 2")
            flat = np.ascontiguousarray(lab[:, 1:].reshape(-1))         # [B*(S-1)], next-token targets
        else:
            flat = _as_int64("labels", labels, 1)                      # [B]
            if flat.shape[0] != ids.shape[0]:
                raise ValueError(f"labels has {flat.shape[0]} entries for a batch of {ids.shape[0]}")
            n = self.meta["num_labels"]
            if flat.size and (flat.min() < 0 or flat.max() >= n):
                raise ValueError(f"classification labels must lie in [0, {n}); got {flat.min()}..{flat.max()}")
        return [ids, mask, flat]

    def train_step(self, input_ids: Any, attention_mask: Any, labels: Any) -> float:
        """One forward/backward/AdamW step on one batch; returns the mean loss (before the update)."""
        inputs = self._inputs(input_ids, attention_mask, labels)
        self.module.train()
        loss = self.module(*inputs)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.steps += 1
        value = float(np.asarray(loss).reshape(-1)[0])
        if not np.isfinite(value):
            raise FloatingPointError(f"ORT training loss became {value} at step {self.steps}: lower the learning rate")
        return value

    def train(self, batches: Iterable[tuple[Any, Any, Any]]) -> list[float]:
        """train_step over (input_ids, attention_mask, labels) batches; returns the losses."""
        return [self.train_step(*b) for b in batches]

    def eval_loss(self, input_ids: Any, attention_mask: Any, labels: Any) -> float:
        """Mean loss of one batch with the eval graph (no update)."""
        inputs = self._inputs(input_ids, attention_mask, labels)
        self.module.eval()
        loss = self.module(*inputs)
        self.module.train()
        return float(np.asarray(loss).reshape(-1)[0])

    # ------------------------------------------------------------------ adapter state
    def adapter_arrays(self) -> dict[str, np.ndarray]:
        """{state-dict key: float32 array} of the trained adapter (no torch needed)."""
        params = self.state.parameters
        return {k: np.array(params[v["onnx_name"]].data, dtype=np.float32, copy=True)
                for k, v in self.meta["adapter"].items()}

    def adapter_state(self) -> dict[str, Any]:
        """Adapter state dict as the torch backend returns it: {key: float32 CPU torch.Tensor}."""
        try:
            import torch
        except ImportError as e:
            raise OrtBackendError(f"adapter_state() returns torch tensors and needs torch ({e}); "
                                  "use adapter_arrays() on a torch-free device") from None
        return {k: torch.from_numpy(a) for k, a in self.adapter_arrays().items()}

    def load_adapter_state(self, state: Mapping[str, Any], reset_optimizer: bool = True,
                           strict: bool = True) -> None:
        """Write an adapter state dict (torch tensors or numpy arrays) into the ORT parameters.

        reset_optimizer: start a fresh AdamW (zero moments, step 0), as a new round does; this
        reloads the export's checkpoint and rebuilds the training session.
        strict: every adapter key must be present and no unknown key may appear.
        """
        spec = self.meta["adapter"]
        unknown = sorted(set(state) - set(spec))
        missing = sorted(set(spec) - set(state))
        if unknown or (strict and missing):
            raise ValueError(f"adapter state does not match the ORT export: unknown keys {unknown[:4]}, "
                             f"missing keys {missing[:4]} (export rank/targets must match)")
        arrays = {k: _as_float32(k, v, spec[k]["shape"]) for k, v in state.items()}
        if reset_optimizer:
            del self.optimizer, self.module
            self.state = None
            self._open(self._api.CheckpointState.load_checkpoint(str(self.dir / "checkpoint")))
            self.steps = 0
        # parameters are written once the state is bound to a session (writing into an unbound
        # state crashes ORT 1.19); the copy is in place, so the optimizer sees the new values.
        for k, a in arrays.items():
            self.state.parameters[spec[k]["onnx_name"]] = a

    def save_checkpoint(self, path: str | Path, include_optimizer: bool = True) -> Path:
        """Save the ORT checkpoint (all parameters, optionally the AdamW state)."""
        p = Path(path)
        self._api.CheckpointState.save_checkpoint(self.state, os.fspath(p), include_optimizer_state=include_optimizer)
        return p

    def export_for_inference(self, path: str | Path) -> Path:
        """Write an inference ONNX model (logits output) with the trained adapter baked in."""
        p = Path(path)
        self.module.export_model_for_inferencing(os.fspath(p), ["logits"])
        return p
