"""SLoRA's sparse delta on the device (`protos.sparse`): trainable values at a fixed random mask of
every LoRA module's base weight, added by a forward hook on the base layer,

    y = base(x) + x @ D^T,   D = densify(values (nnz,), mask (nnz,), (out, in))

so the base weights themselves are never edited and only the nnz values are trained, downloaded
and uploaded (as `<module>.sparse_delta`). The trainer holds them next to its LoRA factors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from protos.sparse import densify, mask_indices, sparse_key


class SparseDelta:
    """The sparse delta of `modules` (LoRA module keys of `model`) at `density`, mask from `seed`."""

    def __init__(self, model: nn.Module, modules: Sequence[str], seed: int, density: float) -> None:
        self.seed, self.density = int(seed), float(density)
        self.params: dict[str, nn.Parameter] = {}  # `<module>.sparse_delta` -> values (nnz,)
        self._hooks: list = []
        named = dict(model.named_modules())
        for mod in modules:
            layer = named.get(mod)
            if layer is None or not hasattr(layer, "get_base_layer"):
                raise ValueError(f"sparse delta: {mod!r} is not a LoRA module of this model")
            base = layer.get_base_layer()
            shape = (int(base.out_features), int(base.in_features))
            device = next(base.parameters()).device
            idx = mask_indices(self.seed, mod, shape, self.density).to(device)
            p = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=device))
            self.params[sparse_key(mod)] = p
            self._hooks.append(base.register_forward_hook(_hook(p, idx, shape)))

    def remove(self) -> None:
        """Take the hooks off the base layers (the delta no longer applies)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _hook(values: nn.Parameter, idx: torch.Tensor, shape: tuple[int, int]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        D = densify(values, idx, shape)  # (out, in)
        x = args[0]
        return output + torch.nn.functional.linear(x.to(D.dtype), D).to(output.dtype)
    return hook
