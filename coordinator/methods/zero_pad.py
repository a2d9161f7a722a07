"""HetLoRA zero-padding: global factors at max_rank; a device of rank r trains rows [:r] of A
and columns [:, :r] of B; uploads are zero-padded to max_rank and averaged (scales folded in
when devices' scales differ)."""
from __future__ import annotations

from ..aggregation import GlobalState, StreamingAggregator
from .base import Method, Served


class ZeroPad(Method):
    name = "zero_pad"
    summary = "HetLoRA: factors zero-padded to the largest rank and averaged"
    common_rank = False

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return self.serve_slices(g, rank)

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)
