"""Adapter-state-dict level: group peft keys per module, and the global state's value type.

Keys follow `peft.get_peft_model_state_dict` (adapter name stripped), see `protos.adapter`:
`<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r); every other key is
a trainable non-LoRA tensor (e.g. a classification head) and is weighted-averaged.

What each method keeps in `GlobalState.modules` and serves to a device is the method's own
business (`coordinator.methods`); this module holds no method names.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, State

from .types import LoraUpdate, lora_scale
from .zo import weighted_state_average



@dataclass(frozen=True)
class DeviceState:
    """One device's upload: adapter state dict, its LoRA alpha / rsLoRA flag, aggregation weight."""

    state: Mapping[str, torch.Tensor]
    alpha: float
    use_rslora: bool = False
    weight: float = 1.0


@dataclass(frozen=True)
class GlobalState:
    """Aggregated global: per-module factors (see module docstring) plus averaged extras."""

    strategy: str  # the method's name
    modules: dict[str, LoraUpdate]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 1.0
    base: dict[str, LoraUpdate] = field(default_factory=dict)  # folded into every device's base weights


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], State]:
    """(module key -> (A, B), other keys -> tensor); raises if a module lacks A or B."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extra: State = {}
    for key, t in state.items():
        if key.endswith(A_SUFFIX) or key.endswith(B_SUFFIX):
            mod = key[: -len(A_SUFFIX)]
            a_key, b_key = mod + A_SUFFIX, mod + B_SUFFIX
            if a_key not in state or b_key not in state:
                raise ValueError(f"module {mod!r} has only one of lora_A/lora_B; upload both")
            modules[mod] = (state[a_key], state[b_key])
        else:
            extra[key] = t
    return modules, extra


def module_updates(device: DeviceState) -> dict[str, LoraUpdate]:
    """Module key -> LoraUpdate at the device's scale (rank read from each A)."""
    mods, _ = split_state(device.state)
    return {m: LoraUpdate(A=A, B=B, scale=lora_scale(device.alpha, int(A.shape[0]), device.use_rslora),
                          weight=float(device.weight)) for m, (A, B) in mods.items()}


def fresh_adapter(shape: tuple[int, int], rank: int, scale: float, gen: torch.Generator) -> LoraUpdate:
    """peft's default init: A ~ kaiming_uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    out, inp = shape
    bound = 1.0 / math.sqrt(inp)
    A = (torch.rand(rank, inp, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return LoraUpdate(A=A, B=torch.zeros(out, rank), scale=scale)


def aggregate_modules(device_states: Sequence[DeviceState],
                      combine: Callable[[list[LoraUpdate]], LoraUpdate]) -> GlobalState:
    """Apply `combine` (e.g. `lambda ups: zero_pad(ups, 16)`) module by module; extras weighted-averaged.

    Every device must upload the same modules and non-LoRA keys; scales come from each device's
    alpha / rsLoRA. For tests and tools; the product's rounds go through `coordinator.engine`.
    """
    if not device_states:
        raise ValueError("no device states to aggregate: the list is empty")
    per_device, extras = [], []
    for i, d in enumerate(device_states):
        try:
            per_device.append(module_updates(d))
        except ValueError as e:
            raise ValueError(f"device {i}: {e}") from e
        extras.append(split_state(d.state)[1])
    names = set(per_device[0])
    for i, mods in enumerate(per_device):
        if set(mods) != names:
            raise ValueError(f"device {i}: LoRA modules differ from device 0's "
                             f"(missing {sorted(names - set(mods))[:3]}, extra {sorted(set(mods) - names)[:3]})")
    modules: dict[str, LoraUpdate] = {}
    for name in sorted(names):
        try:
            modules[name] = combine([mods[name] for mods in per_device])
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from e
    weights = [float(d.weight) for d in device_states]
    extra = weighted_state_average(extras, weights) if any(extras) else {}
    return GlobalState(strategy="", modules=modules, extra=extra, total_weight=float(sum(weights)))
