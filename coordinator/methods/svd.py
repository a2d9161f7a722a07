"""FlexLoRA SVD redistribution: the global is the exact weighted sum of the devices' products
sum_k p_k s_k B_k A_k, kept as SVD-ordered factors (B = U sqrt(S), A = sqrt(S) Vh, at most
cap_rank, computed in factor space: QR of the stacked factors + SVD of the small core). A device
of rank r gets the best rank-r approximation, split evenly between its factors at its scale."""
from __future__ import annotations

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator, rescale_balanced, to_scale, truncate
from ..aggregation.svd import factor_svd, factors_from_svd, recompress
from .base import Method, Served


class SvdRedistribute(Method):
    name = "svd"
    summary = "FlexLoRA: exact sum of B_k A_k, each device gets its rank's best approximation"
    common_rank = False
    factor_space = True
    secagg_refusal = ("SVD redistribution needs sum_k p_k B_k @ A_k, a sum of per-device products; the sum of the "
                      "masked factors is not that sum")

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        s = self.cfg.scale(rank)
        out = {}
        for n, u in g.modules.items():
            t = truncate(u, rank)
            out[n] = rescale_balanced(t, s) if s > 0 else to_scale(t, s)
        return Served(out, {})

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("stacked", max_rank=self.cfg.cap_rank)

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        U, S, Vh = factor_svd(step.B * step.scale, step.A)
        full = factors_from_svd(U, S, Vh, int(S.shape[0]), 1.0, step.weight)
        return recompress(full, self.cfg.cap_rank)
