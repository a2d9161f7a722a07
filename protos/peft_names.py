"""The PEFT type names and their one validator, torch-free (plans are read before torch is
imported, docs/footprint.md); the builders are in `protos.peft_types`."""
from __future__ import annotations

PEFT_TYPES = ("lora", "prompt", "ia3", "bitfit")


def check_kind(kind: str, virtual_tokens: int = 0, where: str = "peft") -> None:
    """Raise ValueError naming `where` unless `kind` is a PEFT type and `virtual_tokens` fits it."""
    if kind not in PEFT_TYPES:
        raise ValueError(f"{where}={kind!r}: choose one of {', '.join(PEFT_TYPES)}")
    if not isinstance(virtual_tokens, int) or isinstance(virtual_tokens, bool) or not 0 <= virtual_tokens <= 4096:
        raise ValueError(f"{where} virtual_tokens={virtual_tokens!r}: expected an integer in [0, 4096]")
    if kind == "prompt" and virtual_tokens < 1:
        raise ValueError(f"{where}='prompt' needs virtual_tokens >= 1 (the trainable prompt's length)")


# (IA)3: peft's default targets for the model types we plan for (peft's
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_...): name suffix -> feed-forward?
IA3_TARGETS = {"bert": {"key": False, "value": False, "output.dense": True},
               "llama": {"k_proj": False, "v_proj": False, "down_proj": True},
               "mistral": {"k_proj": False, "v_proj": False, "down_proj": True},
               "qwen2": {"k_proj": False, "v_proj": False, "down_proj": True}}
ENCODERS_WITH_BIASES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")


def trainable_count(kind: str, architecture: str, linear_shapes: dict[str, tuple[int, int]], hidden: int,
                    layers: int, virtual_tokens: int = 0) -> int:
    """Trainable values of a non-LoRA PEFT type, the task head excluded (what `protos.peft_types.build`
    trains; checked against the built models in tests/test_peft_types.py).

    linear_shapes: Linear module name -> (out, in) in the transformer body. prompt: virtual_tokens x
    hidden; ia3: one vector per target Linear, `out` long (`in` on feed-forward ones); bitfit: every
    bias (BERT-style encoders: each Linear's `out`, two LayerNorms per layer and the embeddings' LayerNorm;
    a CLS pooler's bias (`hidden` more, e.g. MiniLM's) is not counted; Qwen2: the q/k/v projections'). ValueError when a model type's layout is unknown."""
    check_kind(kind, virtual_tokens)
    if kind == "prompt":
        return virtual_tokens * hidden
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
