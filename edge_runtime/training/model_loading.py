"""Load a base model at the plan's precision and wrap it with a peft LoRA adapter.

Precision routes (CPU unless CUDA is present):
- fp32 / bf16 / fp16: `from_pretrained(dtype=...)`.
- int8 / nf4: bitsandbytes through `BitsAndBytesConfig` (works on CPU with device_map="cpu").
- int4: optimum-quanto `qint4` weights (the CPU route); `quant_backend="quanto"` also gives
  int8 as quanto `qint8`.
A causal LM on CPU from a GGUF file (any precision), or from safetensors at a quantized precision
or a dtype other than the stored one, goes through the streaming loader (`stream_load`): one
tensor in flight, no file mapping, each Linear quantized as it arrives; a GGUF base at a
quantized precision keeps the file's own Q4_0 / Q4_1 / Q8_0 blocks (`gguf_linear.GGUFLinear`).
Classification models and CUDA loads use `from_pretrained` (GGUF: dequantized by transformers,
then quanto). The task head (classifier / score) and `lm_head` are never quantized.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.plan import Plan
from edge_runtime.training.imports import (bitsandbytes_installed, needs_bitsandbytes, quantized_with_bnb,
                                           use_bitsandbytes)
from protos.model_load import LOAD_LOCK, ensure_output_head
from protos.pooling import use_checkpoint_pooling
from protos.task import check_label_words

log = logging.getLogger(__name__)

TASK_KINDS = ("classification", "causal_lm")
HEAD_NAMES = ("classifier", "score")
_SKIP_QUANT = ("classifier", "score", "lm_head", "pooler")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model source or the requested precision cannot be used on this device."""


@dataclass(frozen=True)
class TrainTask:
    """What is trained: 'classification' (new head with `num_labels`) or 'causal_lm'.

    label_words: a causal LM's response word per class (label k -> label_words[k]) when its records are
    labelled classification data cast as instructions; empty: `edge_runtime.data.DEFAULT_LABEL_WORDS`.
    """

    kind: str = "classification"
    num_labels: int = 2
    label_words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind {self.kind!r} unknown; use one of {TASK_KINDS}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        object.__setattr__(self, "label_words", check_label_words(self.label_words))


def resolve_task(task: Any) -> TrainTask:
    """Accept a TrainTask, a TaskSpec-like object (`.kind`, optional `.num_labels`, `.label_words`), a dict or a
    str."""
    if isinstance(task, TrainTask):
        return task
    if task is None:
        return TrainTask()
    if isinstance(task, str):
        return TrainTask(kind=_kind_alias(task))
    if isinstance(task, dict):
        return TrainTask(kind=_kind_alias(task.get("kind", "classification")), num_labels=int(task.get("num_labels", 2)),
                         label_words=tuple(task.get("label_words", ())))
    kind = getattr(task, "kind", None) or getattr(task, "task", None) or getattr(task, "name", None)
    if kind is None:
        raise ValueError(f"cannot read a task kind from {task!r}; pass 'classification' or 'causal_lm'")
    return TrainTask(kind=_kind_alias(str(kind)), num_labels=int(getattr(task, "num_labels", 2) or 2),
                     label_words=tuple(getattr(task, "label_words", ()) or ()))


def _kind_alias(kind: str) -> str:
    k = kind.lower().replace("-", "_")
    aliases = {"cls": "classification", "seq_cls": "classification", "sequence_classification": "classification",
               "causal": "causal_lm", "lm": "causal_lm", "instruction": "causal_lm", "generation": "causal_lm"}
    k = aliases.get(k, k)
    if k not in TASK_KINDS:
        raise ValueError(f"task kind {kind!r} unknown; use one of {TASK_KINDS}")
    return k


def malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc); freed fp32 weights otherwise stay resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
HEAP_MMAP_THRESHOLD = 128 * 2**10


def heap_mmap_threshold(nbytes: int = HEAP_MMAP_THRESHOLD) -> None:
    """Serve allocations of `nbytes` or more with mmap (returned to the OS when freed) instead of
    glibc's heap, whose dynamic threshold grows to 32 MiB and then keeps freed temporaries resident.
    A quantized base on CPU dequantizes every Linear in every forward and backward; with the default
    allocator those temporaries stayed resident (llama-95m nf4: 1423 -> 923 MiB peak, docs/memory.md).
    128 KiB, not 1 MiB: activations of a short batch (e.g. (1, 128, 1536) fp32 = 768 KiB) fell under
    a 1 MiB threshold and the heap kept ~0.8 B per Linear weight of freed ones in backprop (llama-400m
    nf4, checkpointing: killable peak 1026 -> 702 MiB; malloc_trim returned the same memory)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes))
    except (OSError, AttributeError):
        pass


def resolve_source(model_src: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for an HF dir, a .gguf file or a dir holding one."""
    p = Path(model_src)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return p, ggufs[0].name
        raise ModelLoadError(f"model directory {p} has neither config.json nor a .gguf file")
    raise FileNotFoundError(f"model {p} does not exist (expected a Hugging Face model directory or a .gguf file)")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bnb_config(precision: str, compute: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(f"base_precision {precision!r} needs bitsandbytes, which is not usable here ({e}); "
                             "install the 'quant' extra or re-plan with base_precision int4 (quanto) or fp32") from None
    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(_SKIP_QUANT))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=list(_SKIP_QUANT))


def quantize_quanto(model: nn.Module, precision: str) -> None:
    """In place: quanto qint4 / qint8 weights for every Linear except heads; then malloc_trim."""
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize
    except ImportError as e:
        raise ModelLoadError(f"base_precision {precision!r} on this route needs optimum-quanto ({e}); "
                             "install the 'quant' extra or re-plan with base_precision fp32") from None
    weights = qint4 if precision in ("int4", "nf4") else qint8
    exclude = [f"*{n}*" for n in _SKIP_QUANT]
    quantize(model, weights=weights, exclude=exclude)
    freeze(model)
    malloc_trim()


def _bnb_route(prec: str, quant_backend: str, gguf: str | None) -> bool:
    """Whether the bitsandbytes route is taken (with 'auto', an installed bitsandbytes that does not
    import falls back to optimum-quanto, logged)."""
    use_bnb = needs_bitsandbytes(prec, quant_backend, bool(gguf))
    bnb_ok = use_bitsandbytes(use_bnb)
    if use_bnb and not bnb_ok and quant_backend == "auto" and bitsandbytes_installed():
        log.warning("base_precision %s: bitsandbytes is installed but does not import here; using optimum-quanto "
                    "(%s) instead", prec, "qint8" if prec == "int8" else "qint4")
        use_bnb = False
    return use_bnb


def _from_pretrained_kwargs(prec: str, compute: torch.dtype, gguf: str | None,
                            use_bnb: bool, use_quanto: bool) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained`: GGUF file, quantization config, device map, dtype."""
    kwargs: dict[str, Any] = {}
    if gguf:
        kwargs["gguf_file"] = gguf
    if use_bnb:
        kwargs["quantization_config"] = _bnb_config(prec, compute)
        kwargs["device_map"] = _device()
        kwargs["dtype"] = compute
    elif use_quanto:
        kwargs["dtype"] = compute
    else:
        kwargs["dtype"] = _DTYPES[prec]
    return kwargs


def _load_tokenizer(directory: Any, gguf: str | None) -> Any:
    """The tokenizer at `directory` (or its GGUF file), with a pad token set."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 - third-party loaders raise many kinds
        raise ModelLoadError(f"cannot load a tokenizer from {directory}{'/' + gguf if gguf else ''}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


END_TOKEN_FALLBACKS = ("sep_token",)


def ensure_end_token(tok: Any, where: str) -> None:
    """A causal LM's tokenizer must end each response with a token: its EOS, else its SEP token
    (BERT-style tokenizers: set as EOS, logged). Neither -> ModelLoadError saying what to add."""
    if tok.eos_token_id is not None:
        return
    for attr in END_TOKEN_FALLBACKS:
        alt = getattr(tok, attr, None)
        if alt is not None and tok.convert_tokens_to_ids(alt) is not None:
            log.warning("the tokenizer of %s has no EOS token; using its %s %r to end each response", where, attr, alt)
            tok.eos_token = alt
            return
    raise ModelLoadError(f"the tokenizer of {where} has no EOS token (eos_token is None) and no SEP token to use "
                         "instead, so a causal LM cannot learn where a response ends; add an end token, e.g. "
                         '"eos_token": "</s>" in its tokenizer_config.json (the token must be in the vocabulary)')


def _load_model(directory: Any, gguf: str | None, t: Any, prec: str, seed: int, kwargs: dict[str, Any]) -> nn.Module:
    """The model with its task head (seeded), loaded under LOAD_LOCK."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        with LOAD_LOCK:  # transformers patches process globals while it loads (protos.model_load)
            torch.manual_seed(seed)  # the new head is initialised inside from_pretrained
            if t.kind == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=t.num_labels,
                                                                           **kwargs)
                use_checkpoint_pooling(model, directory)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
                ensure_output_head(model, info.get("missing_keys", ()))
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load {directory}{'/' + gguf if gguf else ''} as {t.kind} at "
                             f"{prec}: {e}") from e
    return model


def streams(t: TrainTask, directory: Path, gguf: str | None, prec: str) -> bool:
    """Whether `load_base` takes the streaming loader (`stream_load`): a causal LM on CPU from a GGUF
    file (any precision), or from safetensors at a quantized precision or another dtype than stored.
    A same-dtype safetensors base stays mmapped by transformers (views of the file, nothing copied)."""
    if t.kind != "causal_lm" or _device() != "cpu":
        return False
    if gguf:
        return True
    from edge_runtime.training.stream_load import safetensors_dtype

    try:
        stored = safetensors_dtype(directory)
    except (FileNotFoundError, OSError, ValueError):
        return False  # not a plain safetensors checkpoint: transformers' loader decides
    return prec not in _DTYPES or _DTYPES[prec] != stored


def _stream_model(directory: Path, gguf: str | None, prec: str, compute: torch.dtype, use_bnb: bool) -> nn.Module:
    """The causal LM through the streaming loader, under LOAD_LOCK; errors as ModelLoadError."""
    from transformers import AutoConfig

    from edge_runtime.modelspec import spec_from_gguf
    from edge_runtime.training.stream_load import stream_load_causal_lm

    where = f"{directory}{'/' + gguf if gguf else ''}"
    try:
        if gguf:
            cfg = dict(spec_from_gguf(directory / gguf).config)
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        else:
            config = AutoConfig.from_pretrained(directory)
        with LOAD_LOCK:
            model, kept = stream_load_causal_lm(directory, gguf, config, prec, compute, use_bnb)
    except (OSError, ValueError, ImportError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"cannot load {where} as causal_lm at {prec} (streaming loader): {e}") from e
    log.info("streamed %s at %s: %s", where, prec, sorted(set(kept.values())))
    return model


def load_base(model_src: str | Path, plan: Plan, task: Any, seed: int = 0,
              quant_backend: str = "auto") -> tuple[nn.Module, Any]:
    """(model, tokenizer) at `plan.base_precision`, frozen, with the task head (seeded) and
    gradient checkpointing per plan. `quant_backend`: 'auto' | 'bnb' | 'quanto'.

    bitsandbytes is hidden from this process unless the plan takes its route (see
    `edge_runtime.training.imports`); with 'auto', a bitsandbytes that is installed but will
    not import falls back to optimum-quanto (logged)."""
    t = resolve_task(task)
    directory, gguf = resolve_source(model_src)
    prec = plan.base_precision
    use_bnb = _bnb_route(prec, quant_backend, gguf)
    # imported here, once the bitsandbytes route is settled (the helpers below reuse the loaded module)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    compute = _DTYPES[plan.compute_dtype]
    use_quanto = prec == "int4" or (prec in ("int8", "nf4") and not use_bnb)
    kwargs = _from_pretrained_kwargs(prec, compute, gguf, use_bnb, use_quanto)
    tok = _load_tokenizer(directory, gguf)
    if t.kind == "causal_lm":
        ensure_end_token(tok, f"{directory}{'/' + gguf if gguf else ''}")
    streamed = streams(t, directory, gguf, prec)
    if streamed:
        if prec in ("int8", "nf4", "int4"):
            heap_mmap_threshold()
        model = _stream_model(directory, gguf, prec, compute, use_bnb)
    else:
        model = _load_model(directory, gguf, t, prec, seed, kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if use_quanto and not streamed:
        quantize_quanto(model, prec)
    elif use_bnb or streamed:
        malloc_trim()
    elif _device() == "cuda":
        model.to("cuda")
    for p in model.parameters():
        p.requires_grad_(False)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok


def head_names(model: nn.Module) -> list[str]:
    """Top-level names of a sequence-classification head present in `model` ('classifier' / 'score')."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def lora_config(plan: Plan, rank: int, lora_alpha: float, use_rslora: bool, heads: list[str]) -> Any:
    """peft LoraConfig at `rank` (rank_pattern entries capped at `rank`)."""
    from peft import LoraConfig

    if not 1 <= rank <= plan.rank:
        raise ValueError(f"assigned rank {rank} must be within 1..{plan.rank} (the plan's rank)")
    pattern = {k: min(int(v), rank) for k, v in plan.rank_pattern.items()}
    return LoraConfig(r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=list(plan.target_modules),
                      rank_pattern=pattern, lora_dropout=0.0, bias="none", modules_to_save=heads or None)


def apply_lora(base: nn.Module, plan: Plan, rank: int, lora_alpha: float, use_rslora: bool, seed: int) -> nn.Module:
    """Wrap `base` with a fresh LoRA adapter (seeded init); the head goes into modules_to_save."""
    use_bitsandbytes(quantized_with_bnb(base))  # before peft's first import (a no-op after load_base)
    from peft import get_peft_model

    cfg = lora_config(plan, rank, lora_alpha, use_rslora, head_names(base))
    try:
        with LOAD_LOCK:  # the seed and the draws of the init stay together when threads load at once
            torch.manual_seed(seed)
            model = get_peft_model(base, cfg)
    except ValueError as e:
        raise ValueError(f"cannot apply LoRA to target_modules {plan.target_modules}: {e}") from e
    return model
