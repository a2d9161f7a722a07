"""SLoRA's sparse stage, the part both sides share: which entries of a base weight are trained.

A sparse delta of a LoRA module `<module>` travels as one float tensor `<module>.sparse_delta`
(nnz,): the values at a fixed random mask of the base weight (out, in). The mask is not sent: both
sides derive it from the federation's seed, the module's key, the weight's shape and the density
(`mask_indices`, a CPU torch.Generator), so only the values travel in downloads and uploads.

    idx = mask_indices(seed, module, (out, in), density)   # (nnz,) sorted flat indices into out*in
    D = densify(values, idx, (out, in))                    # (out, in), zero off the mask
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

SPARSE_SUFFIX = ".sparse_delta"


def sparse_key(module: str) -> str:
    """The tensor name of `module`'s sparse delta values."""
    return module + SPARSE_SUFFIX


def module_of_sparse(key: str) -> str | None:
    """`<module>` of a sparse delta key, None for any other key."""
    return key[: -len(SPARSE_SUFFIX)] if key.endswith(SPARSE_SUFFIX) else None


def mask_size(shape: Sequence[int], density: float) -> int:
    """nnz of the mask of a (out, in) weight at `density` (at least one entry)."""
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"sparse density must be in (0, 1], got {density}")
    n = int(shape[0]) * int(shape[1])
    return max(1, min(n, round(density * n)))


def mask_indices(seed: int, module: str, shape: Sequence[int], density: float) -> torch.Tensor:
    """(nnz,) int64 sorted flat indices into a (out, in) weight: the entries the sparse stage trains."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"sparse mask of {module!r}: expected a 2-D weight shape (out, in), got {tuple(shape)}")
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
    n = int(shape[0]) * int(shape[1])
    return torch.randperm(n, generator=g)[: mask_size(shape, density)].sort().values


def densify(values: torch.Tensor, idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(out, in) matrix with `values` (nnz,) at the flat indices `idx` (nnz,), zero elsewhere."""
    if values.shape != idx.shape:
        raise ValueError(f"sparse delta has {tuple(values.shape)} values for a mask of {tuple(idx.shape)} entries")
    flat = values.new_zeros(int(shape[0]) * int(shape[1]))
    return flat.index_put((idx,), values).view(int(shape[0]), int(shape[1]))
