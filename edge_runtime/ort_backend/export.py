"""Export a peft-LoRA Hugging Face model to onnxruntime-training artifacts.

Needs torch + peft + onnx + onnxruntime-training (run once, on the device or a build box);
training afterwards needs only onnxruntime-training + numpy (`trainer.OrtTrainer`).

Artifacts directory:
  training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint   (generate_artifacts)
  ort_meta.json   task, inputs, adapter map {state-dict key -> ONNX parameter name, shape},
                  LoRA config, AdamW hyper-parameters, parameter counts, versions
Only the adapter (LoRA factors and peft `modules_to_save`, e.g. a classification head) is
trainable; every other initializer is frozen. Loss: CrossEntropy(ignore_index=-100, mean),
on logits flattened to [N, V] (causal LM: positions 0..S-2, labels shifted left by one, as
transformers does) or [B, C] (sequence classification).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._deps import OrtBackendError, require_artifacts_module, require_onnx

TASKS = ("causal_lm", "classification")
IGNORE_INDEX = -100
META_FILE = "ort_meta.json"
_WRAP_PREFIX = "model."  # ONNX names = wrapper attribute + peft parameter name


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW semantics (decoupled decay applied before the update, adam_mode 0)."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"AdamWConfig.lr={self.lr!r}: expected a positive number")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"AdamWConfig.betas={self.betas!r}: expected two numbers in [0, 1)")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ValueError(f"AdamWConfig eps={self.eps!r} / weight_decay={self.weight_decay!r}: "
                             "expected eps > 0 and weight_decay >= 0")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA configuration applied by `add_lora` (peft conventions: scale = alpha/r or alpha/sqrt(r))."""

    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank={self.rank!r}: expected an integer >= 1")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules is empty: name the Linear modules, e.g. ('q_proj', 'v_proj')")


def add_lora(model: torch.nn.Module, task: str, spec: LoraSpec, seed: int = 0):
    """Wrap a transformers model with a peft LoRA adapter (dropout 0, head trainable for classification)."""
    from edge_runtime.training.imports import quantized_with_bnb, use_bitsandbytes

    use_bitsandbytes(quantized_with_bnb(model))  # before peft's first import
    from peft import LoraConfig, TaskType, get_peft_model

    _check_task(task)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora, rank_pattern=dict(spec.rank_pattern), lora_dropout=0.0,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS)
    return get_peft_model(model, config)


class _LossInputs(torch.nn.Module):
    """Forward used for export: (input_ids [B,S], attention_mask [B,S]) -> logits [N, V] or [B, C]."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.task == "causal_lm":  # [B, S, V] -> [B*(S-1), V]; labels are shifted by the trainer
            return logits[:, :-1, :].reshape(-1, logits.shape[-1])
        return logits  # [B, C]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")


def adapter_name_map(peft_model) -> dict[str, str]:
    """{adapter state-dict key (as get_peft_model_state_dict) -> peft parameter name}.

    Matched by storage (the state dict holds views of the parameters), so the keys are exactly
    the ones the torch backend uploads. Raises if a trainable parameter has no key or vice versa.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    by_ptr = {p.data_ptr(): n for n, p in peft_model.named_parameters() if p.requires_grad}
    mapping = {k: by_ptr[v.data_ptr()] for k, v in state.items() if v.data_ptr() in by_ptr}
    missing = sorted(set(state) - set(mapping))
    unmapped = sorted(set(by_ptr.values()) - set(mapping.values()))
    if missing or unmapped:
        raise OrtBackendError(f"adapter state keys {missing[:4]} have no trainable parameter and trainable "
                              f"parameters {unmapped[:4]} are not in the adapter state: only the LoRA "
                              "adapter (and modules_to_save) may require grad")
    return mapping


def _example_inputs(task: str, vocab: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example batch with right padding in the last row, so the traced graph keeps the mask path."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)       # [B, S]
    mask = torch.ones(batch, seq, dtype=torch.long)                   # [B, S]
    mask[-1, seq // 2:] = 0
    return ids, mask


def export_onnx(peft_model, path: Path, task: str, example_batch: int = 2, example_seq: int = 16,
                opset: int = 17) -> None:
    """torch.onnx.export (TorchScript, dynamo=False) of the loss inputs, with dynamic batch/seq.

    Exported in eval mode (no dropout) with constant folding off, so initializer names stay the
    peft parameter names. `keep_initializers_as_inputs=True` switches off the exporter's
    value-based deduplication (which would merge every zero-initialised LoRA B, and equal
    LayerNorm weights, into one tensor); the initializers are then removed from the graph
    inputs again, as ORT's artifact generator expects.
    """
    onnx = require_onnx()
    wrapper = _LossInputs(peft_model, task).eval()
    ids, mask = _example_inputs(task, int(peft_model.config.vocab_size), example_batch, example_seq)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape branches + exporter deprecation notes
        torch.onnx.export(
            wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["logits"], opset_version=opset, do_constant_folding=False, dynamo=False,
            training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "logits": {0: "rows"}})
    proto = onnx.load(str(path))
    _add_layernorm_stats_outputs(proto)
    inits = {t.name for t in proto.graph.initializer}
    keep = [i for i in proto.graph.input if i.name not in inits]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    onnx.save(proto, str(path))


def _add_layernorm_stats_outputs(proto) -> None:
    """Give every LayerNormalization node its optional Mean/InvStdDev outputs.

    The opset-17 exporter emits LayerNormalization with only Y; ORT's gradient builder for it
    reads the saved statistics (outputs 1 and 2) and fails with `i < node_->OutputDefs().size()`.
    """
    for i, node in enumerate(proto.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}__ln_mean_{i}", f"{node.output[0]}__ln_inv_std_{i}"])


class _TorchAdamWOptimizer:
    """Factory for an AdamWOptimizer node with adam_mode 0 (torch.optim.AdamW update order)."""

    @staticmethod
    def block(cfg: AdamWConfig):
        from onnxruntime.training import onnxblock
        from onnxruntime.training.onnxblock import _graph_utils

        class _Node(onnxblock.optim.optim.AdamWOptimizer):
            def build(self, lr, step, params, grads, m1, m2):  # noqa: D401 - mirrors ORT's signature
                attrs = {"alpha": self._betas[0], "beta": self._betas[1], "epsilon": self._eps,
                         "weight_decay": self._weight_decay, "correct_bias": 1, "adam_mode": 0}
                return self._build_optimizer_node([lr, step, params, grads, m1, m2],
                                                  _graph_utils.generate_graph_name("adamw.updated_flag"),
                                                  "AdamWOptimizer", attrs)

        opt = onnxblock.optim.AdamW(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        opt._adamw = _Node(bias_correction=True, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return opt


def export_artifacts(peft_model, out_dir: str | Path, task: str, optim: AdamWConfig = AdamWConfig(),
                     example_batch: int = 2, example_seq: int = 16, keep_onnx: bool = False) -> Path:
    """Export `peft_model` (a peft LoRA model on a transformers model) to ORT training artifacts.

    Returns the artifacts directory. The adapter's current values become the initial values
    of the ORT checkpoint (so torch and ORT start from the same adapter).
    """
    _check_task(task)
    artifacts = require_artifacts_module()
    onnx = require_onnx()
    from onnxruntime.training import onnxblock

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # generate_artifacts logs every graph pass at INFO
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mapping = adapter_name_map(peft_model)
    onnx_path = out / "forward.onnx"
    export_onnx(peft_model, onnx_path, task, example_batch, example_seq)
    proto = onnx.load(str(onnx_path))
    names = {t.name for t in proto.graph.initializer}
    absent = [n for n in mapping.values() if _WRAP_PREFIX + n not in names]
    if absent:
        raise OrtBackendError(f"trainable parameters {absent[:4]} are not ONNX initializers after export "
                              "(folded or renamed by the exporter)")
    trainable = [_WRAP_PREFIX + n for n in mapping.values()]
    frozen = [t.name for t in proto.graph.initializer if t.name not in set(trainable)]
    artifacts.generate_artifacts(
        proto, requires_grad=trainable, frozen_params=frozen,
        loss=onnxblock.loss.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX),
        optimizer=_TorchAdamWOptimizer.block(optim), artifact_directory=str(out))
    if not keep_onnx:
        onnx_path.unlink()
    params = dict(peft_model.named_parameters())
    meta: dict[str, Any] = {
        "format": 1,
        "task": task,
        "inputs": ["input_ids", "attention_mask"],
        "ignore_index": IGNORE_INDEX,
        "num_labels": int(getattr(peft_model.config, "num_labels", 0)) if task == "classification" else None,
        "vocab_size": int(peft_model.config.vocab_size),
        "adapter": {k: {"onnx_name": _WRAP_PREFIX + n, "shape": list(params[n].shape)} for k, n in mapping.items()},
        "lora": _lora_meta(peft_model),
        "optimizer": {"name": "adamw", **asdict(optim)},
        "n_trainable_params": sum(params[n].numel() for n in mapping.values()),
        "n_frozen_params": sum(int(_numel(t)) for t in proto.graph.initializer if t.name in set(frozen)),
        "export_seconds": round(time.perf_counter() - t0, 3),
        "versions": _versions(),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _lora_meta(peft_model) -> dict[str, Any]:
    cfg = peft_model.peft_config[peft_model.active_adapter]
    return {"rank": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "use_rslora": bool(cfg.use_rslora),
            "target_modules": sorted(cfg.target_modules) if cfg.target_modules else [],
            "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {}),
            "modules_to_save": sorted(cfg.modules_to_save or [])}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "peft", "onnx", "onnxruntime-training"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
