"""FLoRA stacking: B = [p_k s_k B_k], A = [A_k] is exactly sum_k p_k s_k B_k A_k. The global is
the cumulative base delta (scale 1, recompressed by a factor SVD to cap_rank); every device
merges it into its base weights (W += B @ A) and trains a fresh adapter each round."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator
from ..aggregation.state import fresh_adapter
from ..aggregation.svd import recompress
from .base import Method, Served


class Stack(Method):
    name = "stack"
    summary = "FLoRA: stacked factors (exact sum of B_k A_k) merged into every device's base"
    common_rank = False
    serves_base = False  # its serve sends no GlobalState.base (no --init federa)
    factor_space = True
    secagg_refusal = ("FLoRA stacking concatenates each device's factors [B_1..B_K], [A_1;..;A_K]: it needs every "
                      "device's factors individually, which secure aggregation hides")

    def initial_module(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> LoraUpdate:
        return LoraUpdate(A=A, B=torch.zeros_like(B), scale=1.0)  # the cumulative base delta starts at zero

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        s = self.cfg.scale(rank)
        gen = torch.Generator().manual_seed(int(seed))
        adapter, delta = {}, {}
        for n, u in g.modules.items():
            delta[n] = ((u.B.to(torch.float64) * u.scale).float(), u.A.clone())
            adapter[n] = fresh_adapter(u.shape, rank, s, gen)
        return Served(adapter, delta)

    def updates(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]], g: GlobalState,
                start: Mapping[str, torch.Tensor] | None) -> dict[str, LoraUpdate]:
        """A fresh adapter starts at B = 0: its product s_k B_k A_k is the device's whole change."""
        return {n: LoraUpdate(A=A, B=B, scale=self.cfg.scale(int(A.shape[0]))) for n, (A, B) in mods.items()}

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("stacked", max_rank=self.cfg.cap_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        B = torch.cat([old.B * old.scale, step.B * step.scale], dim=1)  # (out, R_old + R_new)
        A = torch.cat([old.A, step.A], dim=0)  # (R_old + R_new, in)
        return recompress(LoraUpdate(A=A, B=B, scale=1.0, weight=step.weight), self.cfg.cap_rank)
