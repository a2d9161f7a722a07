"""Robust aggregation and client-level DP for a round, for every method.

With a defence on (`--robust`, `--clip-norm`, `--dp-noise`), a round is aggregated on
*updates*, i.e. the change of each device's effective adapter since what it downloaded:

    delta_k[m] = s_k B_k A_k - s_k B0_k A0_k        (out, in), kept as rank-2r factors
    delta_k[x] = x_k - x0_k                          non-LoRA tensors (head), flattened (1, n)

(a method that keeps B on the devices, `shares_b = False`: delta_k[m] = A_k - A0_k, zero-padded
to max_rank, flattened.)
Then, with the pure functions of `coordinator.aggregation`:
1. clipping: each device's whole update (all keys jointly) is scaled to Frobenius norm <= C;
2. combine: unweighted mean (`stack`), coordinate-wise `trimmed_mean` or `coordinate_median`,
   or the DP-FedAvg noisy mean (`dp_aggregate`, noise std sigma*C per entry);
3. the global moves by the combined update: G + D, re-factorised by a factor SVD at the
   method's global rank (`Method.global_rank()`: cap_rank for factor-space methods, else max_rank);
   empty rank slots of a non-factor-space global get fresh peft-initialised A rows (B = 0, dW unchanged).
Devices weigh equally under a defence: a claimed example count is not trusted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .aggregation import (DPConfig, GlobalState, LoraUpdate, RDPAccountant, coordinate_median, dp_aggregate,
                          effective, effective_norm, factor_svd, stack, trimmed_mean)
from .aggregation.svd import factors_from_svd
from protos.adapter import A_SUFFIX, B_SUFFIX
from protos.wire import split_download

from .methods import Method

@dataclass(frozen=True)
class RoundUpload:
    """One accepted update, decoded: the device's final adapter state (ZO: already replayed)."""

    device_id: str
    state: dict[str, torch.Tensor]
    weight: float


ROBUST = ("none", "trimmed_mean", "median")
EXTRA = "extra:"
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DefenceConfig:
    """robust: none|trimmed_mean|median; clip_norm C (0 = off); trim: fraction dropped at each end
    (at least one update when K >= 3); dp_noise sigma (0 = off, needs C); dp_delta for the epsilon
    report; dp_sample_rate q of the accountant (the selected fraction)."""

    robust: str = "none"
    clip_norm: float = 0.0
    trim: float = 0.2
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.robust not in ROBUST:
            raise ValueError(f"--robust {self.robust!r}: choose one of {ROBUST}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"--clip-norm {self.clip_norm}: expected a finite number >= 0 (0 = no clipping)")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim {self.trim}: expected a fraction in [0, 0.5)")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise ValueError(f"--dp-noise {self.dp_noise}: expected a finite number >= 0")
        if self.dp_noise > 0 and self.clip_norm <= 0:
            raise ValueError("--dp-noise needs --clip-norm C > 0 (the noise is calibrated to the clipped norm)")
        if self.dp_noise > 0 and self.robust != "none":
            raise ValueError("--dp-noise and --robust cannot be combined (the DP guarantee assumes a plain mean); "
                             "choose one")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"--dp-delta {self.dp_delta}: expected a probability in (0, 1)")
        if not 0 < self.dp_sample_rate <= 1:
            raise ValueError(f"DP sample rate {self.dp_sample_rate}: expected a fraction in (0, 1]")

    @property
    def active(self) -> bool:
        return self.robust != "none" or self.clip_norm > 0 or self.dp_noise > 0


def _flat(x: torch.Tensor) -> LoraUpdate:
    """A dense tensor as a (1, n) pseudo-update: effective() == x.reshape(1, -1)."""
    return LoraUpdate(A=x.detach().double().reshape(1, -1).float(), B=torch.ones(1, 1), scale=1.0)


def device_delta(state: Mapping[str, torch.Tensor], download: Mapping[str, torch.Tensor], g: GlobalState,
                 method: Method) -> dict[str, LoraUpdate]:
    """One device's update as pseudo LoRA updates, key -> LoraUpdate (scale 1); see the module docstring."""
    start, _ = split_download(download)
    out: dict[str, LoraUpdate] = {}
    for name, gm in g.modules.items():
        A, A0 = state[name + A_SUFFIX].float(), start[name + A_SUFFIX].float()
        if not method.shares_b:  # only A is global
            d = torch.zeros(gm.A.shape, dtype=torch.float64)  # (R, in)
            d[: A.shape[0]] = A.double() - A0.double()
            out[name] = _flat(d)
            continue
        s = method.cfg.scale(int(A.shape[0]))
        B, B0 = state[name + B_SUFFIX].double() * s, start[name + B_SUFFIX].double() * s
        out[name] = LoraUpdate(A=torch.cat([A, A0], dim=0), B=torch.cat([B, -B0], dim=1).float(), scale=1.0)
    for key, x0 in g.extra.items():
        out[EXTRA + key] = _flat(state[key].double() - x0.double()) if key in state else _flat(torch.zeros_like(x0))
    return out


def update_norm(delta: Mapping[str, LoraUpdate]) -> float:
    """Frobenius norm of a device's whole update (all keys jointly), from the factors."""
    return math.sqrt(sum(effective_norm(u) ** 2 for u in delta.values()))


def clip(delta: Mapping[str, LoraUpdate], c: float) -> tuple[dict[str, LoraUpdate], float]:
    """(update scaled to norm <= c, factor applied)."""
    n = update_norm(delta)
    f = min(1.0, c / n) if n > 0 else 1.0
    if f == 1.0:
        return dict(delta), 1.0
    return {k: LoraUpdate(A=u.A, B=(u.B.double() * f).float(), scale=u.scale) for k, u in delta.items()}, f


def combine(updates: Sequence[LoraUpdate], dcfg: DefenceConfig, rank: int, gen: torch.Generator) -> LoraUpdate:
    """The combined update of one key over K devices (scale 1)."""
    K = len(updates)
    if dcfg.dp_noise > 0:  # per key; the devices were already clipped jointly, so dp_aggregate's clip is a no-op
        cfg = DPConfig(clip_norm=dcfg.clip_norm * (1 + 1e-9), noise_multiplier=dcfg.dp_noise,
                       sample_rate=dcfg.dp_sample_rate, delta=dcfg.dp_delta)
        res = dp_aggregate([{"k": u} for u in updates], cfg, rank, gen)
        return res.modules["k"]
    if dcfg.robust == "trimmed_mean" and K >= 3:
        b = min(max(1, math.floor(dcfg.trim * K)), (K - 1) // 2)
        return trimmed_mean(updates, rank, trim=b)
    if dcfg.robust == "median":
        return coordinate_median(updates, rank)
    return stack([LoraUpdate(A=u.A, B=u.B, scale=u.scale, weight=1.0) for u in updates])


def _fill_empty(u: LoraUpdate, gen: torch.Generator) -> LoraUpdate:
    """Give zero rank slots peft's init (A ~ U(+-1/sqrt(in)), B = 0) so devices can train them."""
    empty = (u.A.norm(dim=1) == 0) & (u.B.norm(dim=0) == 0)
    if not bool(empty.any()):
        return u
    A = u.A.clone()
    bound = 1.0 / math.sqrt(A.shape[1])
    A[empty] = (torch.rand(int(empty.sum()), A.shape[1], generator=gen) * 2 - 1) * bound
    return LoraUpdate(A=A, B=u.B, scale=u.scale, weight=u.weight)


def apply_update(g: GlobalState, combined: Mapping[str, LoraUpdate], method: Method, weight: float,
                 gen: torch.Generator) -> GlobalState:
    """G + D per key, re-factorised at the method's global rank and scale."""
    target = method.global_rank()
    mods = {}
    for name, gm in g.modules.items():
        d = combined[name]
        if not method.shares_b:
            A = (gm.A.double() + effective(d).reshape(gm.A.shape)).float()
            mods[name] = LoraUpdate(A=A, B=gm.B, scale=gm.scale, weight=weight)
            continue
        B = torch.cat([gm.B.double() * gm.scale, d.B.double() * d.scale], dim=1)  # (out, R + r)
        A = torch.cat([gm.A.double(), d.A.double()], dim=0)  # (R + r, in)
        U, S, Vh = factor_svd(B, A, target)
        new = factors_from_svd(U, S, Vh, target, gm.scale, weight)
        mods[name] = new if method.factor_space else _fill_empty(new, gen)
    extra = {k: (x.double() + effective(combined[EXTRA + k]).reshape(x.shape)).float() for k, x in g.extra.items()}
    return replace(g, modules=mods, extra=extra, total_weight=weight)


def defended_round(g: GlobalState, uploads: Sequence[RoundUpload], downloads: Sequence[Mapping[str, torch.Tensor]],
                   method: Method, dcfg: DefenceConfig, seed: int) -> tuple[GlobalState, dict[str, Any]]:
    """The next global from this round's uploads under `dcfg`, and a JSON-able report."""
    if not uploads:
        raise ValueError("cannot aggregate a round without accepted uploads")
    gen = torch.Generator().manual_seed(int(seed))
    deltas, norms, factors = [], [], []
    for u, dl in zip(uploads, downloads):
        try:
            d = device_delta(u.state, dl, g, method)
        except KeyError as e:
            raise ValueError(f"device {u.device_id}: upload lacks {e} needed for its update") from None
        norms.append(update_norm(d))
        if dcfg.clip_norm > 0:
            d, f = clip(d, dcfg.clip_norm)
            factors.append(f)
        deltas.append(d)
    rank = method.global_rank()
    combined = {}
    for key in deltas[0]:
        combined[key] = combine([d[key] for d in deltas], dcfg, 1 if key.startswith(EXTRA) or not method.shares_b
                                else rank, gen)
    new = apply_update(g, combined, method, float(len(uploads)), gen)
    report: dict[str, Any] = {"defence": dcfg.robust, "update_norms": [round(n, 6) for n in norms]}
    if dcfg.clip_norm > 0:
        report.update(clip_norm=dcfg.clip_norm, clipped=sum(f < 1.0 for f in factors))
    if dcfg.dp_noise > 0:
        report.update(dp_noise=dcfg.dp_noise, dp_noise_std=dcfg.dp_noise * dcfg.clip_norm)
    return new, report


def dp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative epsilon at `delta` after the DP rounds in `history` [(sigma, q), ...]."""
    acc = RDPAccountant()
    for sigma, q in history:
        acc.step(float(sigma), float(q))
    return acc.epsilon(delta)
