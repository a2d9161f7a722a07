"""The PEFT types a federation can train, built the same way on both sides (one home).

- "lora": LoRA (the device's `model_loading.apply_lora`, the coordinator's `initial_adapter_state`).
- "prompt": prompt tuning (Lester et al. 2021; FedPrompt / PromptFL): peft's `PromptTuningConfig`,
  `virtual_tokens` trainable input embeddings (virtual_tokens, hidden) prepended to every input;
  classification models only (the causal-LM loss runs the decoder body without peft's prompt).
- "ia3": (IA)^3 (Liu et al. 2022): peft's `IA3Config` with peft's default targets for the model
  type; one learned scaling vector per target Linear ((out, 1), or (1, in) on feed-forward ones).
- "bitfit": BitFit (Ben Zaken et al. 2022): every bias of the base model trains, nothing else
  (peft has no config for it: `BitFit` below).
- "adapter": bottleneck adapters (Houlsby et al. 2019 / Pfeiffer et al. 2020; FedAdapter) of width
  `bottleneck` after each layer's feed-forward block (`protos.bottleneck`; peft has none either).
The task head (classifier / score) trains with every type, as with LoRA.

For the non-LoRA types the adapter state is `trainable(model)`: every trainable parameter, keyed by
its name with peft's adapter name removed (e.g. `prompt_encoder.embedding.weight` (T, H),
`base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l` (384, 1), `base_model.bert.encoder.
layer.0.attention.self.query.bias` (384,), `base_model.bert.encoder.layer.0.output.dense.bottleneck_adapter.
down.weight` (bottleneck, 384), `...classifier.weight` (labels, H)); a federation averages
these tensors by name (the coordinator's non-LoRA methods keep them as `GlobalState.extra`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .model_load import LOAD_LOCK
from .peft_names import PEFT_TYPES, check_kind  # noqa: F401  (re-exported)

HEAD_NAMES = ("classifier", "score")
ADAPTER = "default"


def heads_of(model: nn.Module) -> list[str]:
    """Top-level names of a sequence-classification head in `model` ('classifier' / 'score')."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def state_key(param_name: str) -> str:
    """A trainable parameter's name with peft's adapter name removed."""
    key = param_name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(f".{ADAPTER}.", ".")
    return key[: -len(ADAPTER) - 1] if key.endswith("." + ADAPTER) else key


def restore_frozen(base: nn.Module, originals: Mapping[str, torch.Tensor]) -> nn.Module:
    """`base` with the named parameters put back to `originals` and frozen (a wrapper's unload)."""
    params = dict(base.named_parameters())
    with torch.no_grad():
        for n, v in originals.items():
            params[n].copy_(v)
            params[n].requires_grad_(False)
    return base


class BitFit(nn.Module):
    """`base` with only its biases (and the task head) trainable; `unload()` puts the original
    values back and returns the base with everything frozen."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_model = base
        heads = tuple(h + "." for h in heads_of(base))
        for p in base.parameters():
            p.requires_grad_(False)
        self._names = [n for n, p in base.named_parameters()
                       if (n.endswith(".bias") or n == "bias" or n.startswith(heads)) and p.is_floating_point()]
        if not any(not n.startswith(heads) for n in self._names):
            raise ValueError(f"BitFit: model {type(base).__name__} has no bias parameters to train "
                             "(e.g. Llama-style models have none); choose peft 'lora' or 'ia3'")
        params = dict(base.named_parameters())
        self._orig = {n: params[n].detach().clone() for n in self._names}
        for n in self._names:
            params[n].requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def unload(self) -> nn.Module:
        return restore_frozen(self.base_model, self._orig)

    def save_pretrained(self, out_dir) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in trainable(self).items()},
                  str(Path(out_dir) / "bitfit_model.safetensors"), metadata={"peft_type": "BITFIT"})


def build(base: nn.Module, kind: str, virtual_tokens: int = 0, seed: int = 0, bottleneck: int = 0) -> nn.Module:
    """`base` wrapped for a non-LoRA PEFT `kind` (fresh, seeded init); the head trains too.
    virtual_tokens: prompt tuning's prompt length; bottleneck: the adapters' width ("adapter")."""
    check_kind(kind, virtual_tokens, bottleneck=bottleneck)
    if kind == "lora":
        raise ValueError("build() makes the non-LoRA types; LoRA has its own builders")
    if kind == "bitfit":
        return BitFit(base)
    if kind == "adapter":
        from .bottleneck import Bottleneck

        with LOAD_LOCK:
            torch.manual_seed(seed)
            return Bottleneck(base, bottleneck, tuple(heads_of(base)))
    from peft import IA3Config, PromptTuningConfig, get_peft_model

    heads = heads_of(base)
    if kind == "prompt" and not heads:
        raise ValueError("peft 'prompt' (prompt tuning) is supported for classification models only; "
                         "choose 'lora' or 'ia3' for a causal LM")
    task = "SEQ_CLS" if heads else "CAUSAL_LM"
    cfg = (PromptTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB")
           if kind == "prompt" else IA3Config(task_type=task, modules_to_save=heads or None))
    with LOAD_LOCK:  # the seed and the draws of the init stay together
        torch.manual_seed(seed)
        return get_peft_model(base, cfg)


def unload(model: nn.Module) -> nn.Module:
    """The base model back from `build`'s wrapper (peft prompt models have no `unload`)."""
    if hasattr(model, "unload") and not getattr(getattr(model, "peft_config", {}).get(ADAPTER), "is_prompt_learning",
                                                  False):
        return model.unload()
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    for name, mod in list(base.named_modules()):
        if isinstance(mod, ModulesToSaveWrapper):
            parent = base.get_submodule(name.rpartition(".")[0]) if "." in name else base
            setattr(parent, name.rpartition(".")[2], mod.original_module)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Key (`state_key`) -> trainable parameter of a `build` model."""
    return {state_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def is_head_key(key: str) -> bool:
    """True for the task head's tensors (they train under every PEFT type)."""
    return any(f".{h}." in f".{key}" for h in HEAD_NAMES)


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "adapter state") -> None:
    """Copy `state` into `trainable(model)`; ValueError naming missing/unexpected keys or a bad shape."""
    params = trainable(model)
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"{what} does not match this model's trainable tensors: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise ValueError(f"{what}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.device, p.dtype))
