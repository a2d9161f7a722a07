"""Row-chunked dequantization of a 4-bit Linear's weight: one home for its size (torch-free).

`training/bnb_rows.py` computes a frozen bitsandbytes 4-bit Linear's no-grad CPU forward with the weight
dequantized `dequant_chunk_rows(in)` rows at a time; the estimator (`edge_runtime.memory`) counts what that
keeps alive (`row_chunk_bytes`).
"""
from __future__ import annotations

from edge_runtime.modelspec import ModelSpec

DEQUANT_CHUNK_BYTES = 16 * 2**20  # dequantized rows per chunk: ~16 MiB (1024 rows of a 4096-wide fp32 weight)


def dequant_chunk_rows(in_features: int, elem_bytes: int = 4, chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> int:
    """Rows of an (out, in) 4-bit weight dequantized at once: ~`chunk_bytes` of `elem_bytes` values, >= 1."""
    return max(1, chunk_bytes // (elem_bytes * in_features))


def row_chunk_bytes(spec: ModelSpec, tokens: int, act_b: float) -> int:
    """Counted bytes alive in a row-chunked no-grad forward of the costliest 4-bit Linear: the (rows, in)
    dequantized chunk and its (tokens, rows) product in the compute dtype, the weight's fp32 absmax (4 B / 64)."""
    def one(o: int, i: int) -> float:
        rows = min(o, dequant_chunk_rows(i, int(act_b)))
        return rows * (i + tokens) * act_b + o * i / 16
    return int(max((one(o, i) for o, i in spec.linear_shapes.values()), default=0))
