"""What a device feeds to secure aggregation for each linear strategy, and how the sum is read back.

A payload is a flat float64 vector `[w * t_1.ravel(), ..., w * t_m.ravel(), w]` over a public
`PayloadLayout` (sorted keys, each at its GLOBAL shape). The coordinator only learns the sum over
survivors: sum_k w_k x_k and sum_k w_k, so the weighted average is their ratio.

- fedavg: every adapter tensor (A, B, head) at the common rank.
- zero_pad: A (r, in) padded with zero rows and B (out, r) with zero columns to the global rank R.
- fedsa: layout holds only lora_A keys (+ head); the device keeps its B (`ignore_extra=True`).
- Scales differ between devices: fold them into B on the device (`b_scale = s_k`), as the plain
  strategies do, and the average has scale 1.0.
- zo: `zo_pack` puts w * g at the position of each seed in the shared seed pool; replaying the
  averaged (seed, g) pairs from the common start equals the weighted average of the devices'
  replays, because each ZO step is additive: p <- p - lr * g * z(seed).

Weights must lie in (0, 1] (e.g. num_examples / a cap the coordinator announces) so that the
weighted values stay inside the fixed-point clip range.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protos.secagg import Wire
from protos.zo import seed_pool

B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class PayloadLayout:
    """Public order and global shape of every tensor in the payload; the last entry is the weight."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], only: Sequence[str] | None = None) -> "PayloadLayout":
        """Layout of a (global, largest-rank) state dict; `only`: key suffixes to keep (fedsa: ['.lora_A.weight'])."""
        keys = sorted(k for k in state if only is None or any(k.endswith(s) for s in only) or "lora_" not in k)
        if not keys:
            raise ValueError("payload layout is empty: the state dict has no tensors to aggregate")
        return cls(tuple((k, tuple(int(d) for d in state[k].shape)) for k in keys))

    @property
    def vector_len(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries) + 1


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not (math.isfinite(w) and 0 < w <= 1):
        raise ValueError(f"payload weight must be in (0, 1], got {weight!r}: divide num_examples by the cap the "
                         f"coordinator announced so weighted values stay inside the clip range")
    return w


def _pad_to(t: torch.Tensor, shape: tuple[int, ...], key: str) -> np.ndarray:
    a = t.detach().to(torch.float64).cpu().numpy()
    if a.ndim != len(shape) or any(s > g for s, g in zip(a.shape, shape)):
        raise ValueError(f"tensor {key!r} has shape {tuple(a.shape)}, which does not fit the global shape {shape}")
    out = np.zeros(shape, dtype=np.float64)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


def pack_state(state: Mapping[str, torch.Tensor], layout: PayloadLayout, *, weight: float, b_scale: float = 1.0,
               ignore_extra: bool = False) -> np.ndarray:
    """Adapter state -> (layout.vector_len,) float64: weight * zero-padded tensors (B times b_scale), then weight."""
    w = _check_weight(weight)
    names = {k for k, _ in layout.entries}
    missing, extra = sorted(names - set(state)), sorted(set(state) - names)
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} payload tensors, e.g. {missing[:3]}")
    if extra and not ignore_extra:
        raise ValueError(f"adapter state has {len(extra)} tensors outside the payload layout, e.g. {extra[:3]}")
    parts = [w * (b_scale if k.endswith(B_SUFFIX) else 1.0) * _pad_to(state[k], shape, k).ravel()
             for k, shape in layout.entries]
    return np.concatenate(parts + [np.array([w])])


def unpack_average(total: np.ndarray, layout: PayloadLayout) -> tuple[dict[str, torch.Tensor], float]:
    """Summed payload (vector_len,) -> (weighted-average state dict, float32 tensors at global shapes; sum of weights)."""
    total = np.asarray(total, dtype=np.float64).reshape(-1)
    if total.shape[0] != layout.vector_len:
        raise ValueError(f"summed payload has {total.shape[0]} entries, layout expects {layout.vector_len}")
    weight = float(total[-1])
    if not weight > 0:
        raise ValueError(f"summed weight is {weight}; no device contributed")
    out, pos = {}, 0
    for key, shape in layout.entries:
        n = math.prod(shape)
        out[key] = torch.from_numpy(total[pos:pos + n] / weight).reshape(shape).to(torch.float32)
        pos += n
    return out, weight


def zo_pack(pairs: Sequence[tuple[int, float]], pool: Sequence[int], *, weight: float) -> np.ndarray:
    """ZO (seed, g) pairs -> (len(pool) + 1,) float64: w * sum of g per pool seed, then w."""
    w = _check_weight(weight)
    where = {int(s): i for i, s in enumerate(pool)}
    vec = np.zeros(len(pool) + 1, dtype=np.float64)
    for seed, g in pairs:
        if int(seed) not in where:
            raise ValueError(f"seed {seed} is not in the round's seed pool; secure ZO aggregation needs a shared pool")
        vec[where[int(seed)]] += w * float(g)
    vec[-1] = w
    return vec


def zo_unpack(total: np.ndarray, pool: Sequence[int]) -> tuple[list[tuple[int, float]], float]:
    """Summed ZO payload -> (averaged (seed, g) pairs for `protos.zo.replay`, sum of weights)."""
    total = np.asarray(total, dtype=np.float64).reshape(-1)
    if total.shape[0] != len(pool) + 1:
        raise ValueError(f"summed ZO payload has {total.shape[0]} entries, expected {len(pool) + 1}")
    weight = float(total[-1])
    if not weight > 0:
        raise ValueError(f"summed weight is {weight}; no device contributed")
    return [(int(s), float(g) / weight) for s, g in zip(pool, total[:-1]) if g != 0.0], weight


# ----------------------------------------------------------------------------- one gRPC round
@dataclass(frozen=True)
class RoundPayload(Wire):
    """Coordinator -> devices (in the Task): how every device forms its payload vector this round.

    layout: public (key, global shape) entries (see PayloadLayout); weight_cap: weight = min(n, cap) / cap;
    fold_scale: multiply B by the device's own LoRA scale (the selected devices' scales differ);
    ignore_extra: the device may hold tensors outside the layout (fedsa keeps B on the device).
    changes: devices send their CHANGE (trained - downloaded, `device_change`), the coordinator adds
    the average change to the global, as plain rounds do (no dilution of slots a device did not train).
    zo_pool_size > 0: seed-scalar mode (strategy zo): every device trains with the pool
    `protos.zo.seed_pool(zo_pool_seed, zo_pool_size)` and sends `zo_scalars` (pool size + 1
    values) instead of its adapter; zo_lr_ref / zo_value_scale set the scalars' units.
    """

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    weight_cap: float
    fold_scale: bool = False
    ignore_extra: bool = False
    zo_pool_seed: int = 0
    zo_pool_size: int = 0
    zo_lr_ref: float = 0.0
    zo_value_scale: float = 1.0
    changes: bool = False
    weight_temper: float = 1.0  # weight = (min(n, cap) / cap) ** temper, as the coordinator's round policy
    loss_weight: float = 0.0  # ... x protos.adapter.loss_factor(the device's mean training loss, q, K)
    num_labels: int = 0

    def __post_init__(self) -> None:
        if not self.layout:
            raise ValueError("secure-aggregation payload layout is empty")
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 1):
            raise ValueError(f"weight_cap must be a finite number >= 1, got {self.weight_cap}")
        if self.zo_pool_size < 0 or (self.zo_pool_size and not (self.zo_lr_ref > 0 and self.zo_value_scale > 0)):
            raise ValueError(f"seed-scalar payload needs a pool size >= 1, zo_lr_ref > 0 and zo_value_scale > 0, got "
                             f"{self.zo_pool_size}, {self.zo_lr_ref}, {self.zo_value_scale}")

    @property
    def zo_scalars(self) -> bool:
        """Seed-scalar mode: devices send per-seed sums of projected gradients, not adapters."""
        return self.zo_pool_size > 0

    @property
    def payload_layout(self) -> PayloadLayout:
        return PayloadLayout(self.layout)

    @property
    def vector_len(self) -> int:
        return self.zo_pool_size + 1 if self.zo_scalars else self.payload_layout.vector_len


def device_change(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trained - downloaded for every tensor the device downloaded (what a `changes` payload carries)."""
    return {k: (v - start[k]) if k in start and start[k].shape == v.shape else v for k, v in state.items()}


def device_weight(rp: RoundPayload, num_examples: int, loss: float | None = None) -> float:
    """(min(num_examples, cap) / cap) ** temper x loss_factor(loss): in (0, 1], so weighted values stay
    inside the clip range."""
    from .adapter import loss_factor

    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    n = (min(float(num_examples), rp.weight_cap) / rp.weight_cap) ** rp.weight_temper
    return n * loss_factor(loss, rp.loss_weight, rp.num_labels)


def device_payload(state: Mapping[str, torch.Tensor], rp: RoundPayload, num_examples: int,
                   scale: float, loss: float | None = None) -> tuple[np.ndarray, float]:
    """A device's (vector_len,) float64 input for the round, and the weight it used.

    state: the device's trained adapter (peft keys, its own rank); scale: its LoRA scale s_k; loss: its
    mean training loss. The weight (`device_weight`) keeps weighted values inside the clip range.
    """
    weight = device_weight(rp, num_examples, loss)
    vec = pack_state(state, rp.payload_layout, weight=weight, b_scale=scale if rp.fold_scale else 1.0,
                     ignore_extra=rp.ignore_extra)
    return vec, weight


def device_zo_payload(pairs: Sequence[tuple[int, float]], lr: float, rp: RoundPayload,
                      num_examples: int, loss: float | None = None) -> tuple[np.ndarray, float]:
    """A ZO device's (pool size + 1,) float64 input in seed-scalar mode, and its weight:
    w * sum of g * (lr / zo_lr_ref) / zo_value_scale at each pool seed's position, then w."""
    if not rp.zo_scalars:
        raise ValueError("this round's secure-aggregation payload is not in seed-scalar mode")
    weight = device_weight(rp, num_examples, loss)
    unit = float(lr) / rp.zo_lr_ref / rp.zo_value_scale
    return zo_pack([(s, g * unit) for s, g in pairs], seed_pool(rp.zo_pool_seed, rp.zo_pool_size),
                   weight=weight), weight


def zo_pairs_from_sum(total: np.ndarray, rp: RoundPayload) -> tuple[list[tuple[int, float]], float]:
    """Summed seed-scalar payload -> ((seed, g) pairs to replay at lr = zo_lr_ref, sum of weights)."""
    pairs, weight = zo_unpack(total, seed_pool(rp.zo_pool_seed, rp.zo_pool_size))
    return [(s, g * rp.zo_value_scale) for s, g in pairs], weight
