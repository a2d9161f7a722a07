"""A frozen Linear that keeps a GGUF file's quantized blocks and dequantizes them per forward.

A device then trains LoRA against exactly the base it runs for inference (llama.cpp), at the
GGUF's size, with no requantization. Block layouts (ggml, 32 weights per block, along `in`):

- Q4_0: 18 bytes = d (fp16) + 16 bytes of 4-bit q;  w = d * (q - 8)
- Q4_1: 20 bytes = d (fp16) + m (fp16) + 16 bytes;  w = d * q + m
- Q8_0: 34 bytes = d (fp16) + 32 int8 q;            w = d * q

In the 16 bytes of a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in
its high nibble. The scales are kept as (out, n_blocks) fp16 tensors and the quants as
(out, n_blocks, 16 | 32) uint8 / int8, i.e. the file's bytes, split by field.

`GGUFLinear` subclasses `nn.Linear` (so peft wraps it with its ordinary `lora.Linear`), but it
has no weight parameter: `weight` is a property that dequantizes (the peft layer reads it once,
for its device and dtype). The forward's autograd function saves nothing: backward dequantizes
again for the input gradient; the base gets no gradient.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edge_runtime.modelspec import GGUF_BLOCK_BYTES

BLOCK = 32
_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
# ggml type id -> (name, bytes per block); the byte sizes live with the GGUF header reader
GGML_TYPES = {t: (name, GGUF_BLOCK_BYTES[t]) for t, name in _NAMES.items()}
NATIVE_TYPES = tuple(GGML_TYPES)


def split_blocks(raw: np.ndarray, qtype: int, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """The file's bytes of one (out, in) tensor -> {"d", ["m"], "qs"}: d/m (out, n_blocks) fp16,
    qs (out, n_blocks, 16) uint8 for Q4_x or (out, n_blocks, 32) int8 for Q8_0."""
    name, nbytes = GGML_TYPES[qtype]
    if in_features % BLOCK:
        raise ValueError(f"{name}: in_features {in_features} is not a multiple of the block size {BLOCK}")
    nb = in_features // BLOCK
    arr = np.ascontiguousarray(raw)
    arr = arr if arr.flags.writeable else arr.copy()
    blocks = torch.from_numpy(arr.reshape(out_features, nb, nbytes))
    out = {"d": blocks[..., 0:2].contiguous().view(torch.float16).reshape(out_features, nb)}
    if name == "Q4_1":
        out["m"] = blocks[..., 2:4].contiguous().view(torch.float16).reshape(out_features, nb)
        out["qs"] = blocks[..., 4:].contiguous()
    elif name == "Q4_0":
        out["qs"] = blocks[..., 2:].contiguous()
    else:
        out["qs"] = blocks[..., 2:].contiguous().view(torch.int8)
    return out


def dequantize_parts(qtype: int, d: torch.Tensor, qs: torch.Tensor, m: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) weight in `dtype` from split blocks (d, m: (out, nb); qs: (out, nb, 16 | 32))."""
    name = GGML_TYPES[qtype][0]
    out_f, nb = d.shape
    if name == "Q8_0":
        q = qs.to(dtype)
    else:
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(dtype)  # (out, nb, 32)
        if name == "Q4_0":
            q = q - 8
    w = q * d.to(dtype).unsqueeze(-1)
    if m is not None:
        w = w + m.to(dtype).unsqueeze(-1)
    return w.reshape(out_f, nb * BLOCK)


class _BlockLinearFn(torch.autograd.Function):
    """y = x @ W^T (+ b) with W dequantized in forward and again in backward (nothing saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: "GGUFLinear") -> torch.Tensor:
        ctx.module = module
        return nn.functional.linear(x, module.dequantize(x.dtype), module.bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.module.dequantize(grad.dtype), None


class GGUFLinear(nn.Linear):
    """Frozen Linear over GGUF blocks (Q4_0 / Q4_1 / Q8_0): x (..., in) -> (..., out)."""

    def __init__(self, qtype: int, parts: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)  # no weight parameter: `weight` is the dequantizing property below
        if qtype not in GGML_TYPES:
            raise ValueError(f"GGML type {qtype} has no block Linear; supported: "
                             f"{[GGML_TYPES[t][0] for t in NATIVE_TYPES]}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("d", parts["d"])
        self.register_buffer("qs", parts["qs"])
        self.register_buffer("m", parts.get("m"))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_raw(cls, raw: np.ndarray, qtype: int, out_features: int, in_features: int,
                 rows: torch.Tensor | None = None) -> "GGUFLinear":
        """From the file's bytes of one tensor; `rows` reorders the output rows (llama q/k un-permute)."""
        parts = split_blocks(raw, qtype, out_features, in_features)
        if rows is not None:
            parts = {k: v[rows].contiguous() for k, v in parts.items()}
        return cls(qtype, parts, in_features, out_features)

    @property
    def qtype_name(self) -> str:
        return GGML_TYPES[self.qtype][0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in `dtype`."""
        return dequantize_parts(self.qtype, self.d, self.qs, self.m, dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """Dequantized (out, in) fp32 copy (read by peft for device / dtype, not by forward)."""
        return self.dequantize(torch.float32)

    def storage_bytes(self) -> int:
        """Bytes of the kept blocks (scales + quants)."""
        return sum(t.numel() * t.element_size() for t in (self.d, self.qs, self.m) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _BlockLinearFn.apply(x, self)
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf={self.qtype_name}"
