"""RoLoRA (Chen et al. 2025): alternate which factor is trained. Odd rounds freeze A and train B,
even rounds freeze B and train A; with the other factor common to every device, averaging the
changes of the trained one is the exact average change of the products (no cross terms):
- B rounds: sum_k p_k s_k dB_k A[:r_k] = (sum_k p_k s_k pad(dB_k)) A;
- A rounds: a device of rank r starts from B0 = B[:, :r] * s / s_k, so s_k B0 dA_k = s B[:, :r] dA_k
  and sum_k p_k s_k B0_k dA_k = s B (sum_k p_k pad(dA_k)): the engine's fold of changes, as is.
ZO devices perturb every tensor; their change to the frozen factor is dropped."""
from __future__ import annotations

from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator
from .base import Method, Served
from .ffa import keep_a


def trains_a(round_id: int) -> bool:
    return round_id > 0 and round_id % 2 == 0


class RoLoRA(Method):
    name = "rolora"
    summary = "RoLoRA: alternate rounds train only B, then only A (exact averages for any ranks)"
    common_rank = False

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return self.serve_slices(g, rank)

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        if mode == "zo":
            return DeviceContract()
        return DeviceContract(frozen=(B_SUFFIX,) if trains_a(round_id) else (A_SUFFIX,))

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        if not trains_a(round_id):
            return keep_a(old, step), 0.0
        return LoraUpdate(A=step.A, B=old.B, scale=old.scale, weight=step.weight), 0.0
