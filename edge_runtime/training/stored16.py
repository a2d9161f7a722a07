"""Frozen embeddings and LM head kept in the checkpoint's 16-bit dtype, computed in fp32 (CPU).

A CPU device computes in fp32 (the Raspberry Pi 5's Cortex-A76 has no bf16 instructions), and the
streaming loader used to widen the never-quantized embeddings and an untied lm_head to fp32 as well:
for LLaMA-2-7B that is 2 x 0.52 GB where the fp16 file holds 2 x 0.26 GB. These modules keep the
file's fp16 / bf16 values as they are and widen only what a step touches (fp16 / bf16 -> fp32 is
exact, so the model computes the same function as the widened copy):

- `Embedding16`: looks up (B, T) ids in the (V, H) 16-bit table and widens the (B, T, H) rows;
- `Head16`: (N, H) hidden states -> (N, V) fp32 logits, widening `HEAD_SLICE_ROWS` rows of the
  (V, H) weight at a time in forward and again in backward (one (slice, H) fp32 temporary, never a
  (V, H) fp32 copy, nothing saved for backward).

Both are frozen (a causal LM's embeddings and head are never trained here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.memory import HEAD_SLICE_ROWS  # one home: the estimator models the (rows, H) fp32 block
STORED16 = (torch.float16, torch.bfloat16)


class Embedding16(nn.Embedding):
    """nn.Embedding whose frozen (V, H) table stays 16-bit; forward returns `compute`-dtype rows."""

    def __init__(self, weight: torch.Tensor, compute: torch.dtype, padding_idx: int | None = None):
        if weight.dtype not in STORED16:
            raise ValueError(f"Embedding16 keeps a 16-bit table, got {weight.dtype}")
        super().__init__(weight.shape[0], weight.shape[1], padding_idx=padding_idx, _weight=weight, _freeze=True,
                         device=weight.device, dtype=weight.dtype)
        self.compute = compute

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) rows in the compute dtype."""
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute)


class _SlicedHead(torch.autograd.Function):
    """logits = x @ w.T with w (V, H) 16-bit widened `rows` rows at a time, forward and backward; saves
    nothing for backward but x's dtype (the frozen weight gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.w, ctx.rows = w, rows
        out = x.new_empty((*x.shape[:-1], w.shape[0]))
        for a in range(0, w.shape[0], rows):
            out[..., a:a + rows] = F.linear(x, w[a:a + rows].to(x.dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        w, rows = ctx.w, ctx.rows
        gx = grad.new_zeros((*grad.shape[:-1], w.shape[1]))
        for a in range(0, w.shape[0], rows):
            gx += grad[..., a:a + rows] @ w[a:a + rows].to(grad.dtype)
        return gx, None, None


class Head16(nn.Linear):
    """Bias-free nn.Linear (H -> V) whose frozen (V, H) weight stays 16-bit; computes in the input's dtype."""

    def __init__(self, weight: torch.Tensor, slice_rows: int = HEAD_SLICE_ROWS):
        if weight.dtype not in STORED16:
            raise ValueError(f"Head16 keeps a 16-bit weight, got {weight.dtype}")
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.slice_rows = int(slice_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) logits; the weight is widened `slice_rows` rows at a time."""
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight)
        return _SlicedHead.apply(x, self.weight, self.slice_rows)


def keep_16bit(model: nn.Module, compute: torch.dtype) -> list[str]:
    """In place: the input embeddings and the (tied or untied) output head of a causal LM whose tables
    are fp16 / bf16 become `Embedding16` / `Head16` when `compute` is wider. Returns what was replaced."""
    done: list[str] = []
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if compute not in (torch.float32,) or emb is None or emb.weight.dtype not in STORED16:
        return done
    tied = head is not None and head.weight is emb.weight
    new_emb = Embedding16(emb.weight.data, compute, emb.padding_idx)
    model.set_input_embeddings(new_emb)
    done.append("embed_tokens")
    if head is not None and head.bias is None and head.weight.dtype in STORED16:
        new_head = Head16(new_emb.weight.data if tied else head.weight.data)
        if tied:
            new_head.weight = new_emb.weight
        model.set_output_embeddings(new_head)
        done.append("lm_head (tied)" if tied else "lm_head")
    return done
