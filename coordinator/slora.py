"""SLoRA (Babakniya et al., 2023): a few federated rounds of sparse fine-tuning, then LoRA started
from the SVD of the sparse stage's delta (`--init slora --slora-rounds N --slora-density D`).

Rounds 1..N (the sparse stage): every device trains a fixed random mask (density D, the same mask on
every device, derived from `MethodConfig.slora_seed`: `protos.sparse`) of each LoRA module's base
weight; the LoRA factors are frozen at their peft init (B = 0: they add nothing). The values travel
as `<module>.sparse_delta` tensors (nnz,) next to the adapter; the engine averages them like any
non-LoRA tensor, so the global's extras hold the averaged sparse delta D (out, in) of every module.

At the close of round N (`after_round`, called by `RoundEngine.close`) the switch: per module the LoRA
factors start at D's top-r singular directions (`aggregation.svd_init.svd_init_factors`:
s B0 A0 = D_r), and the part they do not capture, D - s B0 A0, stays in every model: D as the
sparse delta (frozen from now on: devices keep applying it and no longer upload it, the
coordinator keeps the global's values) and -s B0 A0 as the residual base (`GlobalState.base`,
merged by every device like FeDeRA's), so the model is unchanged at the switch. Rounds N+1.. are
the method's ordinary LoRA rounds.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract
from protos.sparse import SPARSE_SUFFIX, densify, mask_indices, mask_size, sparse_key

from .aggregation import GlobalState, LoraUpdate
from .aggregation.svd_init import svd_init_factors

if TYPE_CHECKING:
    from .methods.base import Method, MethodConfig

INIT = "slora"


def active(cfg: MethodConfig) -> bool:
    return cfg.init == INIT


def sparse_stage(cfg: MethodConfig, round_id: int) -> bool:
    """Whether `round_id` (1-based) trains the sparse delta instead of the LoRA factors."""
    return active(cfg) and 1 <= round_id <= cfg.slora_rounds


def stage_contract(cfg: MethodConfig, round_id: int, contract: DeviceContract) -> DeviceContract:
    """The method's contract for `round_id` with SLoRA's stage: the sparse delta trained and the LoRA
    factors frozen (no pruning) in the sparse stage; after it, the sparse delta applied but frozen."""
    if not active(cfg):
        return contract
    if sparse_stage(cfg, round_id):
        frozen, prune = tuple(dict.fromkeys((*contract.frozen, A_SUFFIX, B_SUFFIX))), 0.0
    else:
        frozen, prune = tuple(dict.fromkeys((*contract.frozen, SPARSE_SUFFIX))), contract.prune_threshold
    return replace(contract, frozen=frozen, prune_threshold=prune, sparse_density=cfg.slora_density,
                   sparse_seed=cfg.slora_seed)


def _shape(u: LoraUpdate) -> tuple[int, int]:
    return int(u.B.shape[0]), int(u.A.shape[1])  # (out, in)


def with_zero_delta(cfg: MethodConfig, g: GlobalState) -> GlobalState:
    """The round-1 global of the sparse stage: `g` plus a zero sparse delta (nnz,) per LoRA module."""
    zeros = {sparse_key(n): torch.zeros(mask_size(_shape(u), cfg.slora_density)) for n, u in g.modules.items()}
    return replace(g, extra={**g.extra, **zeros})


def dense_delta(cfg: MethodConfig, g: GlobalState, module: str) -> torch.Tensor | None:
    """Module's sparse delta D (out, in) from the global's values (None: the global has none)."""
    values = g.extra.get(sparse_key(module))
    if values is None:
        return None
    shape = _shape(g.modules[module])
    return densify(values.float(), mask_indices(cfg.slora_seed, module, shape, cfg.slora_density), shape)


def sparse_deltas(cfg: MethodConfig, g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> (B (out, r), A (r, in)) with B A = D exactly, r = min(out, in): the sparse delta as factors of
    what the global adds to W (evaluation and export only; never sent)."""
    if not active(cfg):
        return {}
    out = {}
    for n in g.modules:
        D = dense_delta(cfg, g, n)
        if D is not None:
            out[n] = (torch.eye(D.shape[0]), D) if D.shape[0] <= D.shape[1] else (D, torch.eye(D.shape[1]))
    return out


def switch(method: Method, g: GlobalState) -> GlobalState:
    """The LoRA start after the sparse stage: per module A0, B0 from D's top-r SVD and the residual
    base -s B0 A0, so that W + D + s B A - s B0 A0 = W + D (a module whose D is zero keeps its init)."""
    cfg = method.cfg
    s = cfg.scale(cfg.max_rank)
    state, base = {}, {}
    for n, u in g.modules.items():
        state[n + A_SUFFIX], state[n + B_SUFFIX] = u.A, u.B * (u.scale / s)
        D = dense_delta(cfg, g, n)
        if D is None or not float(D.abs().max()) > 0:
            continue
        A0, B0 = svd_init_factors(D, cfg.max_rank, s)
        state[n + A_SUFFIX], state[n + B_SUFFIX] = A0, B0
        base[n] = LoraUpdate(A=A0.clone(), B=-B0, scale=s)
    return replace(g, modules=method.initial(state).modules, base={**g.base, **base})


def after_round(method: Method, round_id: int, start: GlobalState, g: GlobalState) -> GlobalState:
    """The next global after `round_id` closed (`start`: the global it began from): the switch at the
    close of the sparse stage; after it, the sparse delta kept at `start`'s values (frozen: devices
    do not upload it, `DeviceContract.uploads`)."""
    cfg = method.cfg
    if not active(cfg) or round_id < cfg.slora_rounds:
        return g
    if round_id == cfg.slora_rounds:
        return switch(method, g)
    kept = {k: v for k, v in start.extra.items() if k.endswith(SPARSE_SUFFIX)}
    return replace(g, extra={**g.extra, **kept})
