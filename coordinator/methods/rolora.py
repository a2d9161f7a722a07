"""RoLoRA (Chen et al. 2025): alternate which factor is trained. Odd rounds freeze A and train B,
even rounds freeze B and train A; with the other factor common to every device, averaging the
trained one is the exact average of the products (no cross terms):
- B rounds: sum_k p_k s_k B_k A[:r_k] = (sum_k p_k s_k pad(B_k)) A;
- A rounds: sum_k p_k s_k B[:, :r_k] A_k = B (sum_k p_k (s_k / s) pad(A_k)) at the global scale s,
  so each device's A is weighted by its scale before the zero-padded mean (`complete_upload`).
ZO devices perturb every tensor; their change to the frozen factor is dropped."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract, State

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator
from .base import Method, Served
from .ffa import keep_a


def trains_a(round_id: int) -> bool:
    return round_id > 0 and round_id % 2 == 0


class RoLoRA(Method):
    name = "rolora"
    summary = "RoLoRA: alternate rounds train only B, then only A (exact averages for any ranks)"
    common_rank = False
    secagg_refusal = ("RoLoRA's A rounds weight each device's A by its own LoRA scale before summing, which a "
                      "masked sum of mixed-rank uploads cannot do")

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return self.serve_slices(g, rank)

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        if mode == "zo":
            return DeviceContract()
        return DeviceContract(frozen=(B_SUFFIX,) if trains_a(round_id) else (A_SUFFIX,))

    def complete_upload(self, state: Mapping[str, torch.Tensor], g: GlobalState, round_id: int = 0) -> State:
        if not trains_a(round_id):
            return dict(state)
        out = dict(state)
        ref = self.cfg.scale(self.cfg.max_rank)
        for k, t in state.items():
            if k.endswith(A_SUFFIX):  # A_k * s_k / s, B_k * s / s_k: the product is unchanged
                f = self.cfg.scale(int(t.shape[0])) / ref
                out[k], out[k[: -len(A_SUFFIX)] + B_SUFFIX] = t * f, state[k[: -len(A_SUFFIX)] + B_SUFFIX] / f
        return out

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        if not trains_a(round_id):
            return keep_a(old, step), 0.0
        return LoraUpdate(A=step.A, B=old.B, scale=old.scale, weight=step.weight), 0.0
