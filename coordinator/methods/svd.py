"""FlexLoRA SVD redistribution: the global is the exact weighted sum of the devices' products
sum_k p_k s_k B_k A_k, kept as SVD-ordered factors (B = U sqrt(S), A = sqrt(S) Vh, at most
cap_rank, computed in factor space: QR of the stacked factors + SVD of the small core). A device
of rank r gets the best rank-r approximation, split evenly between its factors at its scale."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator, rescale_balanced, to_scale, truncate
from ..aggregation.svd import factor_svd, factors_from_svd, recompress
from .base import Method, Served, starts_of


class SvdRedistribute(Method):
    name = "svd"
    summary = "FlexLoRA: exact sum of B_k A_k, each device gets its rank's best approximation"
    common_rank = False
    serves_base = False  # its serve sends no GlobalState.base (no --init federa)
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

    def updates(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]], g: GlobalState,
                start: Mapping[str, torch.Tensor] | None) -> dict[str, LoraUpdate]:
        """Each device's change of its product, as factors: s_k (B_k A_k - B0_k A0_k) =
        s_k [B_k, -B0_k] [A_k; A0_k] (rank 2 r_k); `finalise` adds the average to the global. (Folding
        the products themselves would pull the global towards each device's rank-r truncation of it.)"""
        out = {}
        starts = starts_of(self, g, mods, start)
        for n, (A, B) in mods.items():
            r = int(A.shape[0])
            A0, B0 = starts[n]
            out[n] = LoraUpdate(A=torch.cat([A.float(), A0.float()]), B=torch.cat([B.float(), -B0.float()], dim=1),
                                scale=self.cfg.scale(r))
        return out

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        B = torch.cat([old.B.double() * old.scale, step.B.double() * step.scale], dim=1)  # (out, R_old + R_step)
        A = torch.cat([old.A.double(), step.A.double()], dim=0)
        U, S, Vh = factor_svd(B, A)
        keep = max(1, int((S > S[0] * 1e-10).sum())) if S.numel() else 1  # numerically zero directions dropped
        full = factors_from_svd(U, S, Vh, keep, 1.0, step.weight)
        return recompress(full, self.cfg.cap_rank)
