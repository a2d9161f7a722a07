"""The PEFT type names and their one validator, torch-free (plans are read before torch is
imported, docs/footprint.md); the builders are in `protos.peft_types`."""
from __future__ import annotations

PEFT_TYPES = ("lora", "prompt", "ia3", "bitfit", "adapter")
DEFAULT_BOTTLENECK = 16  # a bottleneck adapter's width when nothing else is said (plans, the `adapter` method)


def check_kind(kind: str, virtual_tokens: int = 0, where: str = "peft", bottleneck: int = 0) -> None:
    """Raise ValueError naming `where` unless `kind` is a PEFT type and `virtual_tokens` (prompt
    tuning's prompt length) and `bottleneck` (a bottleneck adapter's width) fit it."""
    if kind not in PEFT_TYPES:
        raise ValueError(f"{where}={kind!r}: choose one of {', '.join(PEFT_TYPES)}")
    if not isinstance(virtual_tokens, int) or isinstance(virtual_tokens, bool) or not 0 <= virtual_tokens <= 4096:
        raise ValueError(f"{where} virtual_tokens={virtual_tokens!r}: expected an integer in [0, 4096]")
    if kind == "prompt" and virtual_tokens < 1:
        raise ValueError(f"{where}='prompt' needs virtual_tokens >= 1 (the trainable prompt's length)")
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or not 0 <= bottleneck <= 65536:
        raise ValueError(f"{where} bottleneck={bottleneck!r}: expected an integer in [0, 65536]")
    if kind == "adapter" and bottleneck < 1:
        raise ValueError(f"{where}='adapter' needs bottleneck >= 1 (the adapter's bottleneck width, e.g. "
                         f"{DEFAULT_BOTTLENECK}), got {bottleneck}")


# (IA)3: peft's default targets for the model types we plan for (peft's
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_...): name suffix -> feed-forward?
IA3_TARGETS = {"bert": {"key": False, "value": False, "output.dense": True},
               "llama": {"k_proj": False, "v_proj": False, "down_proj": True},
               "mistral": {"k_proj": False, "v_proj": False, "down_proj": True},
               "qwen2": {"k_proj": False, "v_proj": False, "down_proj": True}}
ENCODERS_WITH_BIASES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")
# Bottleneck adapters: the feed-forward block's output module per model type (a regular expression
# matching the end of its name; one per transformer layer): BERT-style: the FFN's output projection
# (before the residual LayerNorm), DistilBERT: its `ffn`, Llama-style decoders: the `mlp`.
_BERT_FFN = r"encoder\.layer\.\d+\.output\.dense"
_DECODER_FFN = r"layers\.\d+\.mlp"
BOTTLENECK_TARGETS = {"bert": _BERT_FFN, "roberta": _BERT_FFN, "xlm-roberta": _BERT_FFN, "electra": _BERT_FFN,
                      "distilbert": r"transformer\.layer\.\d+\.ffn", "llama": _DECODER_FFN,
                      "mistral": _DECODER_FFN, "qwen2": _DECODER_FFN}


def bottleneck_target(architecture: str | None) -> str:
    """The FFN-output name pattern of `architecture` (`BOTTLENECK_TARGETS`); ValueError for an unknown one."""
    if architecture not in BOTTLENECK_TARGETS:
        raise ValueError(f"peft 'adapter': no feed-forward block known for model type {architecture!r} (known: "
                         f"{', '.join(BOTTLENECK_TARGETS)}); choose 'lora' or 'ia3'")
    return BOTTLENECK_TARGETS[architecture]


def trainable_count(kind: str, architecture: str, linear_shapes: dict[str, tuple[int, int]], hidden: int,
                    layers: int, virtual_tokens: int = 0, bottleneck: int = 0) -> int:
    """Trainable values of a non-LoRA PEFT type, the task head excluded (what `protos.peft_types.build`
    trains; checked against the built models in tests/test_peft_types.py).

    linear_shapes: Linear module name -> (out, in) in the transformer body. prompt: virtual_tokens x
    hidden; ia3: one vector per target Linear, `out` long (`in` on feed-forward ones); bitfit: every
    bias (BERT-style encoders: each Linear's `out`, two LayerNorms per layer and the embeddings' LayerNorm;
    a CLS pooler's bias (`hidden` more, e.g. MiniLM's) is not counted; Qwen2: the q/k/v projections');
    adapter: per layer W_down (bottleneck, hidden), W_up (hidden, bottleneck) and their biases. ValueError
    when a model type's layout is unknown."""
    check_kind(kind, virtual_tokens, bottleneck=bottleneck)
    if kind == "prompt":
        return virtual_tokens * hidden
    if kind == "adapter":
        bottleneck_target(architecture)
        return layers * (2 * hidden * bottleneck + bottleneck + hidden)
    if kind == "ia3":
        targets = IA3_TARGETS.get(architecture)
        if targets is None:
            raise ValueError(f"peft 'ia3': no default (IA)3 targets known for model type {architecture!r} "
                             f"(known: {', '.join(IA3_TARGETS)})")
        return sum((i if ff else o) for name, (o, i) in linear_shapes.items()
                   for t, ff in targets.items() if name.endswith("." + t))
    if kind == "bitfit":
        if architecture in ENCODERS_WITH_BIASES:
            return sum(o for o, _ in linear_shapes.values()) + (2 * layers + 1) * hidden
        if architecture == "qwen2":
            return sum(o for n, (o, _) in linear_shapes.items() if n.endswith(("q_proj", "k_proj", "v_proj")))
        raise ValueError(f"peft 'bitfit': model type {architecture!r} has no bias layout known here (Llama-style "
                         "models have no biases); choose 'lora' or 'ia3'")
    raise ValueError("trainable_count() counts the non-LoRA types; LoRA's is r x (in + out) per target")
