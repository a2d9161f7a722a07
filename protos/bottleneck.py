"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; federated: FedAdapter, Cai et
al. 2023): a small residual MLP after each transformer layer's feed-forward block,

    h (..., hidden) -> h + W_up gelu(W_down h + b_down) + b_up,

W_down (bottleneck, hidden) (nn.Linear's kaiming-uniform init, seeded by the caller), W_up (hidden,
bottleneck) and b_up zero, so a freshly wrapped model computes exactly what the base computes.

Where (`protos.peft_names.BOTTLENECK_TARGETS`, by `config.model_type`): BERT-style encoders: each
layer's FFN output projection `encoder.layer.N.output.dense` (before its dropout and residual
LayerNorm, Houlsby's place); Llama-style decoders: each `model.layers.N.mlp`. The adapter is a
child module of its target (`<target>.bottleneck_adapter`) applied by a forward hook, so the base's
own parameter names do not change; `unload()` removes hooks and children and puts the head back.
The adapters are float32 whatever the base's dtype (its activations are cast in and out)."""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from .peft_names import bottleneck_target
from .peft_types import restore_frozen

CHILD = "bottleneck_adapter"  # the attribute each target module holds its adapter under


class BottleneckAdapter(nn.Module):
    """h (..., hidden) -> h + up(gelu(down(h))); starts as the identity (`up` zero)."""

    def __init__(self, hidden: int, size: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, hidden, device=device, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _apply_adapter(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: the target's output through its adapter (reads the module, so copies stay consistent)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"bottleneck adapter: {type(module).__name__} returned {type(out).__name__}, expected a "
                        "tensor (hidden states)")
    return getattr(module, CHILD)(out)


def ffn_outputs(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each layer's feed-forward output in `base`; ValueError for an unknown model type
    or a model without the expected modules."""
    arch = getattr(getattr(base, "config", None), "model_type", None)
    pattern = re.compile(r"(?:^|\.)" + bottleneck_target(arch) + "$")
    found = [(n, m) for n, m in base.named_modules() if pattern.search(n)]
    if not found:
        raise ValueError(f"peft 'adapter': model {type(base).__name__} (type {arch!r}) has no module matching "
                         f"{pattern.pattern!r}; is it a {arch} transformer?")
    return found


class Bottleneck(nn.Module):
    """`base` with a bottleneck adapter after each FFN (and its task head) trainable, everything else frozen;
    `unload()` removes the adapters, puts the head's original values back and returns the base."""

    def __init__(self, base: nn.Module, size: int, heads: tuple[str, ...] = ()) -> None:
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"peft 'adapter': bottleneck={size!r}, expected an integer >= 1")
        targets = ffn_outputs(base)
        self.base_model, self.size = base, size
        hidden = int(base.config.hidden_size)
        for p in base.parameters():
            p.requires_grad_(False)
        prefixes = tuple(h + "." for h in heads)
        self._head = {n: p.detach().clone() for n, p in base.named_parameters() if n.startswith(prefixes)}
        params = dict(base.named_parameters())
        for n in self._head:
            params[n].requires_grad_(True)
        self._hooks = []
        for _, module in targets:
            device = next((p.device for p in module.parameters()), None)
            module.add_module(CHILD, BottleneckAdapter(hidden, size, device))
            self._hooks.append(module.register_forward_hook(_apply_adapter))

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def unload(self) -> nn.Module:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for _, module in list(self.base_model.named_modules()):
            if CHILD in module._modules:
                delattr(module, CHILD)
        return restore_frozen(self.base_model, self._head)

    def save_pretrained(self, out_dir) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if p.requires_grad}
        save_file(tensors, str(Path(out_dir) / "bottleneck_adapter.safetensors"),
                  metadata={"peft_type": "ADAPTER", "bottleneck": str(self.size)})
