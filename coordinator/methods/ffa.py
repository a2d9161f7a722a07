"""FFA-LoRA (Sun et al. 2024): A stays frozen at its shared random init and only B is trained and
averaged. With one A for every device, the average of the products is exact for any ranks:
sum_k p_k s_k B_k A[:r_k] = (sum_k p_k s_k pad(B_k)) A, so the zero-padded mean of s_k B_k times
the common A is the exact aggregate (no cross terms, unlike averaging both factors). ZO devices
perturb every tensor; their change to A is dropped (A is the method's constant)."""
from __future__ import annotations

from protos.adapter import A_SUFFIX, DeviceContract

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator, to_scale
from .base import Method, Served


def keep_a(old: LoraUpdate, step: LoraUpdate) -> LoraUpdate:
    """The old (frozen) A with the round's B expressed at the old scale: B (out, R), A (R, in)."""
    return LoraUpdate(A=old.A, B=to_scale(step, old.scale).B, scale=old.scale, weight=step.weight)


class FFALoRA(Method):
    name = "ffa"
    summary = "FFA-LoRA: A frozen at its shared init, only B trained and averaged (exact for any ranks)"
    common_rank = False
    # Half the trainable tensors and A fixed at its small random init: B's gradient is scaled by A,
    # so B moves slowly at LoRA's rate. Measured on SST-2 (docs/federated.md): 2x the round's rate
    # (for B; the head trains at the round's rate).
    lr_factor = 2.0

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return self.serve_slices(g, rank)

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        return DeviceContract(frozen=(A_SUFFIX,)) if mode != "zo" else DeviceContract()

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        return keep_a(old, step), 0.0
