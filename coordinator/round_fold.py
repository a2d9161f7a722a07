"""Streaming round aggregation: fold each accepted upload in as it arrives.

Memory is O(global state), not O(devices x adapter): per module one
`coordinator.aggregation.StreamingAggregator` (running sums, or concatenated factors
recompressed to `cap_rank`), plus a float64 running weighted sum of the non-LoRA extras.
The uploads themselves stay on disk (the store writes each one before it is folded), so
a restarted coordinator rebuilds the same fold by re-reading them one at a time.

`RoundFold.result(g)` reproduces `coordinator.strategy.aggregate_round(g, uploads, cfg)`:
exactly for fedavg / zo / zero_pad / fedsa (up to float rounding) and for stack / svd while
the stacked rank stays within `cap_rank`; beyond it the stream is recompressed and the
discarded fraction is reported (`stream_rel_error`, an upper bound on the relative error).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from . import strategy as S
from .aggregation import GlobalState, LoraUpdate, StreamingAggregator, factor_svd, lora_scale, split_state
from .aggregation.svd import factors_from_svd

State = dict[str, torch.Tensor]


class RoundFold:
    """One round's running aggregate. `add(device_id, state, weight)`, then `result(global)`."""

    def __init__(self, round_id: int, g: GlobalState, cfg: S.StrategyConfig) -> None:
        self.round_id, self.cfg = round_id, cfg
        self.devices: set[str] = set()
        self._modules = {name: self._aggregator() for name in g.modules}
        self._out_dim = {name: u.shape[0] for name, u in g.modules.items()}
        self._extra: dict[str, torch.Tensor] = {}  # key -> sum_k w_k extra_k (float64)
        self.total_weight = 0.0

    def _aggregator(self) -> StreamingAggregator:
        name = self.cfg.name
        if name in ("fedavg", "zo"):
            return StreamingAggregator("fedavg")
        if name in ("zero_pad", "fedsa"):
            return StreamingAggregator("zero_pad", rank=self.cfg.max_rank)
        return StreamingAggregator("stack", max_rank=self.cfg.cap_rank)  # stack, svd

    @property
    def count(self) -> int:
        return len(self.devices)

    def add(self, device_id: str, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one validated upload (ZO: the replayed final adapter). Raises ValueError on mismatch."""
        if device_id in self.devices:
            raise ValueError(f"device {device_id} was already folded into round {self.round_id}")
        if not weight > 0:
            raise ValueError(f"device {device_id}: aggregation weight must be positive, got {weight}")
        state = dict(state)
        if self.cfg.name == "fedsa":  # LoRA devices keep B; aggregation reads only A
            for k in [k for k in state if k.endswith(S.A_SUFFIX)]:
                bkey = k[: -len(S.A_SUFFIX)] + S.B_SUFFIX
                state.setdefault(bkey, torch.zeros(self._out_dim[k[: -len(S.A_SUFFIX)]], state[k].shape[0]))
        mods, extra = split_state(state)
        if set(mods) != set(self._modules):
            raise ValueError(f"device {device_id}: LoRA modules differ from the global's "
                             f"(missing {sorted(set(self._modules) - set(mods))[:3]})")
        if self._extra and set(extra) != set(self._extra):
            raise ValueError(f"device {device_id}: non-LoRA keys differ from the first upload's")
        for name, (A, B) in mods.items():
            s = lora_scale(self.cfg.lora_alpha, int(A.shape[0]), self.cfg.use_rslora)
            try:
                self._modules[name].add(LoraUpdate(A=A, B=B, scale=s, weight=float(weight)))
            except ValueError as e:
                raise ValueError(f"device {device_id}, module {name!r}: {e}") from e
        for k, t in extra.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"device {device_id}: {k} contains non-finite values")
            acc = self._extra.get(k)
            w = float(weight) * t.to(torch.float64)
            self._extra[k] = w if acc is None else acc + w
        self.devices.add(device_id)
        self.total_weight += float(weight)

    def nbytes(self) -> int:
        """Bytes held by the running aggregate (independent of the number of devices folded)."""
        n = sum(t.numel() * t.element_size() for t in self._extra.values())
        for agg in self._modules.values():
            n += sum(t.numel() * t.element_size() for t in (agg._A, agg._B, agg._Bs) if t is not None)
        return n

    def result(self, g: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        """(next global, metrics) from the folded uploads and the current global `g`."""
        if not self.devices:
            raise ValueError(f"round {self.round_id}: no uploads were folded; nothing to aggregate")
        W = self.total_weight
        extra = {k: (v / W).float() for k, v in sorted(self._extra.items())}
        name = self.cfg.name
        metrics = {"stream_rank": max(a.current_rank for a in self._modules.values()),
                   "stream_rel_error": max(a.relative_error for a in self._modules.values())}
        mods: dict[str, LoraUpdate] = {}
        recompress_err = 0.0
        for mod, agg in sorted(self._modules.items()):
            step = agg.result()
            if name in ("fedavg", "zo", "zero_pad"):
                mods[mod] = step
            elif name == "fedsa":
                mods[mod] = LoraUpdate(A=step.A, B=torch.zeros(step.B.shape), scale=1.0, weight=W)
            elif name == "svd":
                U, Sv, Vh = factor_svd(step.B, step.A)
                full = factors_from_svd(U, Sv, Vh, int(Sv.shape[0]), 1.0, W)
                mods[mod], err = _recompress(full, self.cfg.cap_rank)
                recompress_err = max(recompress_err, err)
            else:  # stack: cumulative base delta += this round's step, recompressed to cap
                old = g.modules[mod]
                B = torch.cat([old.B * old.scale, step.B * step.scale], dim=1)  # (out, R_old + R_new)
                A = torch.cat([old.A, step.A], dim=0)  # (R_old + R_new, in)
                mods[mod], err = _recompress(LoraUpdate(A=A, B=B, scale=1.0, weight=W), self.cfg.cap_rank)
                recompress_err = max(recompress_err, err)
        metrics["recompress_rel_error"] = recompress_err
        out_name = "fedavg" if name == "zo" else name
        return GlobalState(out_name, mods, extra, W), metrics


def _recompress(u: LoraUpdate, cap: int) -> tuple[LoraUpdate, float]:
    """(`strategy.recompress(u, cap)`, ||discarded||_F / ||B @ A||_F)."""
    if u.rank <= cap:
        return u, 0.0
    U, Sv, Vh = factor_svd(u.B * u.scale, u.A)
    total = float(Sv.pow(2).sum().sqrt())
    err = float(Sv[cap:].pow(2).sum().sqrt()) / total if total > 0 else 0.0
    return factors_from_svd(U, Sv, Vh, cap, 1.0, u.weight), err
