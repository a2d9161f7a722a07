"""Fold updates one at a time with memory O(global state) instead of O(all uploads).

Kinds (maths, not method names):
- mean / padded: running weighted sums of (padded) A and B, plus the sum of s_k w_k B_k
  so the scale convention of the batch functions is reproduced (kept when all scales are
  equal, otherwise folded into B with scale 1).
- stacked: the unnormalised factor-space sum sum_k w_k s_k B_k A_k as concatenated
  factors Bs (out, R), As (R, in). When R exceeds `max_rank` the sum is recompressed by a
  factor-space SVD to `max_rank`; the Frobenius norm discarded is accumulated and
  `relative_error` reports (sum of discarded norms) / ||streamed sum||_F; the numerator
  bounds ||streamed - exact||_F (triangle inequality). Exact while R <= max_rank.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .svd import factor_svd, factors_from_svd
from .types import LoraUpdate, pad
from .validation import validate_rank, validate_updates

KINDS = ("mean", "padded", "stacked")  # one common rank | zero-padded to `rank` | factor-space sum


class StreamingAggregator:
    """`add(update)` one at a time, then `result()` (or `svd_result(ranks, scales)` for stacked)."""

    def __init__(self, kind: str, *, rank: int | None = None, max_rank: int = 256) -> None:
        if kind not in KINDS:
            raise ValueError(f"streaming supports {KINDS}, got {kind!r}")
        if kind == "padded" and rank is None:
            raise ValueError("streaming padded needs the target rank up front (rank=...)")
        self.kind = kind
        self.rank = None if rank is None else validate_rank(rank)
        self.max_rank = validate_rank(max_rank, "max_rank")
        self.count = 0
        self.total_weight = 0.0
        self._shape: tuple[int, int] | None = None
        self._scale: float | None = None
        self._scales_equal = True
        self._A = self._B = self._Bs = None  # running sums (float64)
        self._discarded = 0.0

    def add(self, update: LoraUpdate) -> None:
        i = self.count
        try:
            (u,) = validate_updates([update])
        except ValueError as e:
            raise ValueError(str(e).replace("update 0", f"update {i}")) from e
        if self._shape is None:
            self._shape, self._scale = u.shape, float(u.scale)
        elif u.shape != self._shape:
            raise ValueError(f"update {i}: effective shape {u.shape} differs from the first update's {self._shape}")
        self._scales_equal &= float(u.scale) == self._scale
        w = float(u.weight)
        A64, B64 = u.A.to(torch.float64), u.B.to(torch.float64)
        if self.kind in ("mean", "padded"):
            target = self.rank if self.kind == "padded" else (self._A.shape[0] if self._A is not None else u.rank)
            if u.rank > target or (self.kind == "mean" and u.rank != target):
                raise ValueError(f"update {i}: rank {u.rank} does not fit the {self.kind} aggregate's rank {target}")
            p = pad(LoraUpdate(A=A64, B=B64, scale=u.scale), target)
            if self._A is None:
                self._A = torch.zeros_like(p.A)
                self._B, self._Bs = torch.zeros_like(p.B), torch.zeros_like(p.B)
            self._A += w * p.A
            self._B += w * p.B
            self._Bs += (w * u.scale) * p.B
        else:
            Bw = (w * u.scale) * B64
            self._B = Bw if self._B is None else torch.cat([self._B, Bw], dim=1)
            self._A = A64 if self._A is None else torch.cat([self._A, A64], dim=0)
            if self._A.shape[0] > self.max_rank:
                self._recompress()
        self.count += 1
        self.total_weight += w

    def _recompress(self) -> None:
        U, S, Vh = factor_svd(self._B, self._A)
        k = self.max_rank
        self._discarded += float(S[k:].pow(2).sum().sqrt()) if S.shape[0] > k else 0.0
        root = S[:k].sqrt()
        self._B, self._A = U[:, :k] * root, root[:, None] * Vh[:k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._A, self._B, self._Bs) if t is not None)

    @property
    def current_rank(self) -> int:
        return 0 if self._A is None else int(self._A.shape[0])

    @property
    def relative_error(self) -> float:
        """(sum of Frobenius norms discarded by recompression) / ||streamed sum||_F."""
        if self._discarded == 0.0 or self._A is None:
            return 0.0
        B, A = self._B, self._A
        norm = math.sqrt(max(float(torch.trace((B.T @ B) @ (A @ A.T))), 0.0))
        return self._discarded / norm if norm > 0 else math.inf

    def result(self) -> LoraUpdate:
        """The weighted average: mean/padded as the batch fedavg/zero_pad; stacked as the batch stack."""
        if self.count == 0:
            raise ValueError("no updates were added: nothing to aggregate")
        W = self.total_weight
        if self.kind in ("mean", "padded"):
            keep = self._scales_equal
            B = self._B / W if keep else self._Bs / W
            return LoraUpdate(A=(self._A / W).float(), B=B.float(), scale=self._scale if keep else 1.0, weight=W)
        return LoraUpdate(A=self._A.float(), B=(self._B / W).float(), scale=1.0, weight=W)

    def svd_result(self, ranks: Sequence[int], scales: Sequence[float] | None = None) -> list[LoraUpdate]:
        """stacked only: the average's best rank-r approximation for each r in `ranks`."""
        if self.kind != "stacked" or self.count == 0:
            raise ValueError("svd_result needs a stacked aggregate with at least one update")
        W = self.total_weight
        if scales is not None and len(scales) != len(ranks):
            raise ValueError(f"got {len(scales)} scales for {len(ranks)} ranks")
        U, S, Vh = factor_svd(self._B / W, self._A, k=max(int(r) for r in ranks))
        return [factors_from_svd(U, S, Vh, validate_rank(r), 1.0 if scales is None else float(scales[j]), W)
                for j, r in enumerate(ranks)]


class PairedAggregator:
    """Both a zero-padded mean of the factors and the stacked sum of the products of the same updates
    (FedEx-LoRA needs mean(B) mean(A) and mean(B A) to find the residual). `result()` -> (mean, stacked)."""

    def __init__(self, rank: int, max_rank: int) -> None:
        self.mean = StreamingAggregator("padded", rank=rank)
        self.products = StreamingAggregator("stacked", max_rank=max_rank)

    def add(self, update: LoraUpdate) -> None:
        self.mean.add(update)
        self.products.add(update)

    def result(self) -> tuple[LoraUpdate, LoraUpdate]:
        return self.mean.result(), self.products.result()

    def nbytes(self) -> int:
        return self.mean.nbytes() + self.products.nbytes()

    @property
    def current_rank(self) -> int:
        return self.products.current_rank

    @property
    def relative_error(self) -> float:
        return self.products.relative_error
