"""Row-chunked CPU forward of frozen bitsandbytes 4-bit Linears: y = x W^T + b without a whole fp32 W.

bitsandbytes' CPU `gemm_4bit` dequantizes a Linear's whole (out, in) weight per call (172 MiB of fp32
for an 11008 x 4096 Linear), and on x86 with avx512-bf16 a no-grad forward first repacks the weight
(transient copies, then bf16 compute). A 4-bit weight is quantized in blocks of `blocksize` consecutive
values of the row-major (out, in) weight, so when `in` is a multiple of the block size a run of rows is a
contiguous slice of the packed bytes and of the absmax. `chunked_forward` dequantizes
`dequant_chunk_rows(in)` rows at a time (about `DEQUANT_CHUNK_BYTES` of fp32) with bitsandbytes' own
`dequantize_4bit` and writes those output columns; a double-quantized absmax (4 B per block, 1/16 B per
weight) is dequantized once per call as bitsandbytes does. Same values as bitsandbytes' forward up to the
matmul's summation order.

`RowChunkedLinear4bit` takes this path when no autograd graph is recorded (zeroth-order forwards,
evaluation: `torch.is_grad_enabled()` is False) on CPU; otherwise (backprop, CUDA, rows that do not end
on block boundaries, an avx512-repacked weight) it runs bitsandbytes' own forward unchanged.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from edge_runtime.dequant_rows import DEQUANT_CHUNK_BYTES, dequant_chunk_rows  # one home: the estimator counts it


def chunkable(module: nn.Module) -> bool:
    """Whether `module`'s 4-bit weight can be dequantized by rows: 2-D, rows ending on block boundaries,
    not repacked for bitsandbytes' avx512-bf16 kernel."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return False
    return state.shape[1] % state.blocksize == 0


def _absmax(state: Any) -> torch.Tensor:
    """The fp32 per-block absmax (n_blocks,) of a QuantState; a nested one dequantized as bitsandbytes does."""
    import bitsandbytes.functional as F
    if not state.nested:
        return state.absmax.float()
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def chunked_forward(module: nn.Module, x: torch.Tensor, chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> torch.Tensor:
    """(..., in) -> (..., out) through a frozen bitsandbytes Linear4bit, no autograd: the weight dequantized
    `dequant_chunk_rows` rows at a time ((rows, in) in the compute dtype alive, never the (out, in) weight)."""
    import bitsandbytes.functional as F
    state = module.weight.quant_state
    out_f, in_f = (int(d) for d in state.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"input has {x.shape[-1]} features, the 4-bit Linear expects {in_f}")
    inp_dtype = x.dtype
    dtype = module.compute_dtype or x.dtype
    x2 = x.to(dtype).reshape(-1, in_f)
    packed = module.weight.data.view(torch.uint8).reshape(-1)
    absmax = _absmax(state)
    per_row = in_f // state.blocksize
    step = dequant_chunk_rows(in_f, torch.finfo(dtype).bits // 8, chunk_bytes)
    y = torch.empty(x2.shape[0], out_f, dtype=dtype)
    for a in range(0, out_f, step):
        b = min(out_f, a + step)
        part = F.QuantState(absmax=absmax[a * per_row:b * per_row], shape=torch.Size((b - a, in_f)),
                            blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype)
        w = F.dequantize_4bit(packed[a * in_f // 2:b * in_f // 2], part)  # (b - a, in)
        y[:, a:b] = x2 @ w.t()
        del w  # one chunk alive at a time
    if module.bias is not None:
        y += module.bias.to(dtype)
    return y.reshape(*x.shape[:-1], out_f).to(inp_dtype)


@functools.cache
def _row_chunked_class() -> type:
    """`RowChunkedLinear4bit`, built on first use (bitsandbytes is imported only on its route)."""
    import bitsandbytes as bnb

    class RowChunkedLinear4bit(bnb.nn.Linear4bit):
        """bitsandbytes Linear4bit whose no-grad CPU forward dequantizes the weight by rows (`chunked_forward`)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu" or torch.is_grad_enabled() or not chunkable(self):
                return super().forward(x)
            bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
            return chunked_forward(self, x)

    RowChunkedLinear4bit.__module__, RowChunkedLinear4bit.__qualname__ = __name__, "RowChunkedLinear4bit"
    return RowChunkedLinear4bit


def __getattr__(name: str) -> type:
    """`bnb_rows.RowChunkedLinear4bit` by name (pickling a model finds its class here)."""
    if name == "RowChunkedLinear4bit":
        return _row_chunked_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def row_chunked(module: nn.Module) -> nn.Module:
    """`module` (a bitsandbytes Linear4bit) as a `RowChunkedLinear4bit`, in place (same parameters and state)."""
    cls = _row_chunked_class()
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"row_chunked expects a bitsandbytes Linear4bit, got {type(module).__name__}")
    module.__class__ = cls
    return module
