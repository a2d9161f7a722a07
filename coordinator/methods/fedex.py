"""FedEx-LoRA (Singhal et al. 2025): average A and B as FedAvg does, then fold the exact residual
into the base weights, so the global model is exactly the average of the devices' models:
sum_k p_k s B_k A_k = s mean(B) mean(A) + R,  R = sum_k p_k s B_k A_k - s mean(B) mean(A).
The adapter is kept zero-padded at max_rank (devices of rank r train its slice, their changes
folded as in zero_pad); R accumulates over rounds as low-rank factors (recompressed to cap_rank)
in `GlobalState.base`, which every device merges into its base weights like stack's delta."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..aggregation import GlobalState, LoraUpdate, PairedAggregator
from ..aggregation.svd import recompress
from .base import Method, Served


def residual(mean: LoraUpdate, products: LoraUpdate) -> LoraUpdate:
    """sum_k p_k s B_k A_k - s mean(B) mean(A) as factors, scale 1: B (out, R + r), A (R + r, in)."""
    B = torch.cat([products.B.double() * products.scale, -mean.B.double() * mean.scale], dim=1)
    A = torch.cat([products.A.double(), mean.A.double()], dim=0)
    return LoraUpdate(A=A.float(), B=B.float(), scale=1.0, weight=mean.weight)


class FedExLoRA(Method):
    name = "fedex"
    summary = "FedEx-LoRA: FedAvg of A and B plus the exact residual folded into the base weights"
    common_rank = False
    secagg_refusal = ("FedEx-LoRA's residual needs the sum of each device's product B_k A_k, which a masked sum "
                      "of factors does not give")

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        adapter = self.serve_slices(g, rank).adapter
        return Served(adapter, self.base_delta(g))

    def aggregator(self) -> PairedAggregator:
        return PairedAggregator(self.cfg.max_rank, self.cfg.cap_rank)

    def next_global(self, g: GlobalState, steps: Mapping[str, Any], extra: dict[str, torch.Tensor], weight: float,
                    round_id: int = 0) -> tuple[GlobalState, float]:
        mods, base, err = {}, dict(g.base), 0.0
        for name, (mean, products) in steps.items():
            mods[name] = mean
            r = residual(mean, products)
            old = base.get(name)
            if old is not None:
                r = LoraUpdate(A=torch.cat([old.A, r.A]), B=torch.cat([old.B * old.scale, r.B], dim=1), scale=1.0)
            base[name], e = recompress(r, self.cfg.cap_rank)
            err = max(err, e)
        return replace(g, strategy=self.name, modules=mods, extra=extra, total_weight=weight, base=base), err

    def deltas(self, g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for n, u in g.modules.items():
            b = g.base.get(n)
            B, A = u.B * u.scale, u.A
            if b is not None:
                B, A = torch.cat([B, b.B * b.scale], dim=1), torch.cat([A, b.A])
            out[n] = (B, A)
        return out
