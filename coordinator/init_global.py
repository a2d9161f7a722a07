"""The round-1 global of a federation: peft's random init, or FeDeRA's SVD init (`MethodConfig.init`).

    g = initial_global(method, init_state, base_weights)

init_state: the peft adapter state at max_rank (`coordinator.model.initial_adapter_state`);
base_weights: the base model's state dict (keys without peft's prefix, e.g.
`bert.encoder.layer.0.attention.self.query.weight`, (out, in)). With "federa" every LoRA module
starts at the principal part of its weight (`aggregation.svd_init`) and `GlobalState.base` holds
the residual -s B0 A0 that every device merges into its base, so the initial model is unchanged.
With "slora" the global starts at peft's init plus a zero sparse delta (`coordinator.slora`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX

from . import slora
from .aggregation import GlobalState, LoraUpdate
from .aggregation.svd_init import svd_init_factors
from .methods import Method
from .model import PEFT_PREFIX


def weight_of(base_weights: Mapping[str, torch.Tensor], module: str) -> torch.Tensor:
    """The base weight (out, in) of a LoRA module key (peft-prefixed)."""
    key = (module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module) + ".weight"
    W = base_weights.get(key)
    if W is None:
        raise ValueError(f"--init federa: LoRA module {module!r} has no base weight {key!r} in the model")
    return W


def initial_global(method: Method, init_state: Mapping[str, torch.Tensor],
                   base_weights: Mapping[str, torch.Tensor]) -> GlobalState:
    """`method.initial(init_state)`, or (cfg.init == "federa") from the SVD of the base weights, or
    (cfg.init == "slora") with a zero sparse delta."""
    cfg = method.cfg
    if cfg.init == "random":
        return method.initial(init_state)
    if cfg.init == slora.INIT:  # the sparse stage first; its delta's SVD starts LoRA later (coordinator.slora)
        return slora.with_zero_delta(cfg, method.initial(init_state))
    s = cfg.scale(cfg.max_rank)
    state, base = dict(init_state), {}
    for key in sorted(k for k in init_state if k.endswith(A_SUFFIX)):
        mod = key[: -len(A_SUFFIX)]
        A0, B0 = svd_init_factors(weight_of(base_weights, mod), cfg.max_rank, s)
        state[key], state[mod + B_SUFFIX] = A0, B0
        base[mod] = LoraUpdate(A=A0.clone(), B=-B0, scale=s)
    return replace(method.initial(state), base=base)
