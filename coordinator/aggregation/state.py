"""Adapter-state-dict level aggregation: group peft keys per module, apply a strategy.

Keys follow `peft.get_peft_model_state_dict` (adapter name stripped):
`<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r); every other key is
a trainable non-LoRA tensor (e.g. a classification head) and is weighted-averaged.

How the global state moves between rounds, per strategy:
- fedavg / zo: one global adapter at the common rank; every device downloads it as is
  (converted to its own scale).
- zero_pad: global factors stay at the largest rank; a device of rank r takes rows [:r] of
  A and columns [:, :r] of B.
- svd: the global is the exact aggregate kept as SVD-ordered factors (B = U sqrt(S),
  A = sqrt(S) Vh); a device of rank r gets that rank's truncation, i.e. the best rank-r
  approximation, split evenly between its factors at its own scale.
- stack: the stacked product is merged into the base weights on every device
  (`DeviceDownload.base_delta`, W <- W + B @ A) and every device starts a fresh adapter.
- fedsa: only A is global (zero-padded to the largest rank); a device takes rows [:r] and
  keeps its own B (no lora_B keys are sent).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .fedavg import fedavg
from .fedsa import fedsa
from .stack import stack
from .svd import factor_svd, factors_from_svd, stacked_factors
from .types import LoraUpdate, lora_scale, rescale_balanced, to_scale, truncate
from .validation import validate_rank, validate_updates
from .zero_pad import zero_pad
from .zo import weighted_state_average

STRATEGIES = ("fedavg", "zero_pad", "stack", "svd", "fedsa", "zo")
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
State = dict[str, torch.Tensor]


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

    strategy: str
    modules: dict[str, LoraUpdate]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    total_weight: float = 1.0


@dataclass(frozen=True)
class DeviceDownload:
    """What a device receives: an adapter state dict (+ extras) and, for stack, a base delta.

    base_delta maps module key -> (B (out, R), A (R, in)) with the scale folded in, to be
    merged as W <- W + B @ A before training the fresh adapter in `state`.
    """

    state: dict[str, torch.Tensor]
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


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


def _as_device(d: DeviceState | Sequence, i: int) -> DeviceState:
    if isinstance(d, DeviceState):
        return d
    try:
        state, alpha, rslora, weight = d
    except (TypeError, ValueError) as e:
        raise ValueError(f"device {i}: expected (state_dict, alpha, use_rslora, weight), got {type(d).__name__}") from e
    return DeviceState(state=state, alpha=float(alpha), use_rslora=bool(rslora), weight=float(weight))


def aggregate_state(strategy: str, device_states: Sequence[DeviceState | Sequence], *,
                    rank: int | None = None) -> GlobalState:
    """Aggregate adapter state dicts module by module with `strategy` (one of STRATEGIES).

    device_states: DeviceState or (state_dict, alpha, use_rslora, weight) tuples.
    rank: the global rank for zero_pad / fedsa (default: the largest device rank).
    Every device must upload the same modules and the same non-LoRA keys.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; choose one of {STRATEGIES}")
    devices = [_as_device(d, i) for i, d in enumerate(device_states)]
    if not devices:
        raise ValueError("no device states to aggregate: the list is empty")
    per_device, extras = [], []
    for i, d in enumerate(devices):
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
        ups = [mods[name] for mods in per_device]
        try:
            modules[name] = _aggregate_module(strategy, ups, rank)
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from e
    weights = [d.weight for d in devices]
    extra = weighted_state_average(extras, weights) if any(extras) else {}
    return GlobalState(strategy=strategy, modules=modules, extra=extra, total_weight=float(sum(weights)))


def _aggregate_module(strategy: str, ups: list[LoraUpdate], rank: int | None) -> LoraUpdate:
    if strategy in ("fedavg", "zo"):
        return fedavg(ups)
    if strategy == "zero_pad":
        return zero_pad(ups, rank)
    if strategy == "stack":
        return stack(ups)
    if strategy == "svd":
        ups = validate_updates(ups)
        U, S, Vh = factor_svd(*stacked_factors(ups))
        return factors_from_svd(U, S, Vh, int(S.shape[0]), 1.0, float(sum(u.weight for u in ups)))
    # fedsa: A only; B is a placeholder of zeros (devices keep their own B)
    A = fedsa(ups, rank)
    return LoraUpdate(A=A, B=torch.zeros(ups[0].shape[0], A.shape[0]), scale=1.0,
                      weight=float(sum(u.weight for u in ups)))


def slice_for_device(global_state: GlobalState, rank: int, alpha: float, use_rslora: bool = False,
                     *, seed: int = 0) -> DeviceDownload:
    """What a device of `rank` (with its alpha / rsLoRA) downloads from `global_state`."""
    validate_rank(rank)
    s = lora_scale(alpha, rank, use_rslora)
    strategy = global_state.strategy
    state: State = {}
    delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(int(seed))
    for name, g in global_state.modules.items():
        if strategy in ("fedavg", "zo"):
            if g.rank != rank:
                raise ValueError(f"module {name!r}: {strategy} keeps one rank ({g.rank}); cannot serve rank {rank}")
            u = to_scale(g, s)
        elif strategy == "zero_pad":
            u = to_scale(truncate(g, rank), s)
        elif strategy == "svd":
            u = rescale_balanced(truncate(g, rank), s) if s > 0 else to_scale(truncate(g, rank), s)
        elif strategy == "stack":
            delta[name] = ((g.B.to(torch.float64) * g.scale).float(), g.A.clone())
            u = fresh_adapter(g.shape, rank, s, gen)
        else:  # fedsa
            state[name + A_SUFFIX] = truncate(g, rank).A
            continue
        state[name + A_SUFFIX], state[name + B_SUFFIX] = u.A.contiguous(), u.B.contiguous()
    state.update({k: v.clone() for k, v in global_state.extra.items()})
    return DeviceDownload(state=state, base_delta=delta)


def fresh_adapter(shape: tuple[int, int], rank: int, scale: float, gen: torch.Generator) -> LoraUpdate:
    """peft's default init: A ~ kaiming_uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    out, inp = shape
    bound = 1.0 / math.sqrt(inp)
    A = (torch.rand(rank, inp, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return LoraUpdate(A=A, B=torch.zeros(out, rank), scale=scale)
