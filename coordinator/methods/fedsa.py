"""FedSA-LoRA: only A (zero-padded to max_rank) and the head are global; a LoRA device keeps its
own B on the device (the contract's `keep_local`). A ZO device cannot keep state the coordinator
does not know, so the coordinator keeps its last replayed B and sends it back."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from protos.adapter import B_SUFFIX, DeviceContract, State

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator, truncate
from .base import Method, Served, fill_zero_b


class FedSA(Method):
    name = "fedsa"
    summary = "FedSA-LoRA: A averaged (zero-padded); B stays on each device"
    common_rank = False
    serves_base = False  # its serve sends no GlobalState.base (no --init federa)
    shares_b = False

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        s = self.cfg.scale(rank)
        return Served({n: LoraUpdate(A=truncate(u, rank).A, B=None, scale=s) for n, u in g.modules.items()}, {})

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        return DeviceContract() if mode == "zo" else DeviceContract(keep_local=(B_SUFFIX,))

    def coordinator_keeps(self, mode: str) -> tuple[str, ...]:
        return (B_SUFFIX,) if mode == "zo" else ()

    def complete_upload(self, state: Mapping[str, torch.Tensor], g: GlobalState, round_id: int = 0) -> State:
        return fill_zero_b(state, g)  # aggregation reads only A

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        return LoraUpdate(A=step.A, B=torch.zeros(step.B.shape), scale=1.0, weight=step.weight), 0.0

    def deltas(self, g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {}  # no global B: the global alone adds nothing to W
