"""HetLoRA (Cho et al., 2024): zero-padding over heterogeneous ranks plus rank self-pruning.

Served like `zero_pad` (rows [:r] of A, columns [:, :r] of B at the device's scale) and folded the
same way (each device's change, zero-padded to max_rank). With `MethodConfig.prune_threshold` > 0
the download's contract tells a LoRA device to prune: after training it drops its trailing rank
slots while their share of its product B A stays at most the threshold
(`edge_runtime.training.prune`), uploads at the smaller rank r' and reports it; the coordinator
accepts any rank 1 <= r' <= the served one and assigns r' from the next round on (the device
trains and sends less). A pruned device's dropped slots keep the global's values (its change there
is zero), so they are not shrunk towards zero as plain zero-padding would.

Sparsity-weighted aggregation: each device's weight (the round policy's) is multiplied by the
Frobenius norm of its uploaded product, sqrt(sum over modules ||s_k B_k A_k||_F^2), so devices whose
adapters carry more (less sparse) updates count more (`product_norm`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract

from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator
from .base import Method, Served, starts_of


def uploaded_rank(state: Mapping[str, torch.Tensor], served: Mapping[str, tuple[int, ...]]) -> int | None:
    """The one rank r' every A (r', in) in `state` has, if 1 <= r' <= its served rank and each
    A's matching B is (out, r'); None otherwise (the validator then reports the served shapes)."""
    ranks = set()
    for key, shape in served.items():
        if not key.endswith(A_SUFFIX):
            continue
        A, B = state.get(key), state.get(key[: -len(A_SUFFIX)] + B_SUFFIX)
        if A is None or A.dim() != 2 or not 1 <= A.shape[0] <= shape[0]:
            return None
        if B is not None and (B.dim() != 2 or B.shape[1] != A.shape[0]):
            return None
        ranks.add(int(A.shape[0]))
    return ranks.pop() if len(ranks) == 1 else None


def rebased_change(G: LoraUpdate, A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor,
                   s_k: float, s0: float, s: float) -> LoraUpdate:
    """The global at max rank moved by one device's change on the slots it uploaded.

    G: global (A (R, in), B (out, R), scale G.scale); A (r', in), B (out, r'): the upload at scale s_k;
    A0 (r, in), B0 (out, r): what it downloaded at scale s0 (r >= r'); s: the max-rank scale.
    Returns A = G.A + pad(A - A0[:r']), B = G.B G.scale/s + pad(s_k B - s0 B0[:, :r']) / s.
    """
    r = int(A.shape[0])
    A_new = G.A.double().clone()
    B_new = (G.B.double() * (G.scale / s)).clone()
    A_new[:r] += A.double() - A0[:r].double()
    B_new[:, :r] += (B.double() * s_k - B0[:, :r].double() * s0) / s
    return LoraUpdate(A=A_new.float(), B=B_new.float(), scale=s)


def product_norm(mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> float:
    """sqrt(sum over modules ||scale B A||_F^2) for module -> (A (r, in), B (out, r)), from the r x r
    Gram matrices (no out x in product is formed)."""
    total = 0.0
    for A, B in mods.values():
        total += float(((A.double() @ A.double().T) * (B.double().T @ B.double())).sum().clamp_min(0.0))
    return abs(scale) * total ** 0.5


class HetLoRA(Method):
    name = "hetlora"
    summary = "HetLoRA: zero-padding + rank self-pruning (--prune-threshold); devices may upload a lower rank"
    common_rank = False
    prunes_rank = True
    secagg_refusal = ("HetLoRA devices may prune their rank after training, so an upload's shape is not known when "
                      "the masks are agreed, and its sparsity-weighted aggregation scales each device's weight by the "
                      "norm of its own product, which the coordinator never sees under masking (zero_pad is the same "
                      "padding without either)")

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return self.serve_slices(g, rank)

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        # a ZO device's upload is replayed at its served rank: it never prunes
        return DeviceContract(prune_threshold=self.cfg.prune_threshold if mode != "zo" else 0.0)

    def expected_upload(self, state: Mapping[str, torch.Tensor], download: Mapping[str, torch.Tensor], mode: str,
                        round_id: int = 0) -> dict[str, tuple[int, ...]]:
        shapes = self.upload_shapes(download, mode, round_id)
        r = uploaded_rank(state, shapes) if self.device_contract(mode, round_id).prune_threshold else None
        if r is None:
            return shapes
        return {k: ((r, v[1]) if k.endswith(A_SUFFIX) else (v[0], r) if k.endswith(B_SUFFIX) else v)
                for k, v in shapes.items()}

    def aggregator(self) -> StreamingAggregator:
        return StreamingAggregator("padded", rank=self.cfg.max_rank)

    def weight_factor(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Sparsity-weighted aggregation: the norm of the device's product (floored so that an
        all-zero upload still counts a little and a round never has zero total weight)."""
        r = int(next(iter(mods.values()))[0].shape[0]) if mods else self.cfg.max_rank
        return max(product_norm(mods, self.cfg.scale(r)), 1e-6)

    def updates(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]], g: GlobalState,
                start: Mapping[str, torch.Tensor] | None) -> dict[str, LoraUpdate]:
        """Each device's change rebased on the global (`rebased_change`), at its uploaded rank r' and
        scale against what it downloaded at rank r >= r'."""
        cfg = self.cfg
        s = cfg.scale(cfg.max_rank)
        starts = starts_of(self, g, mods, start)
        out = {}
        for n, (A, B) in mods.items():
            A0, B0 = starts[n]
            B0 = torch.zeros(B.shape[0], A0.shape[0]) if B0 is None else B0
            out[n] = rebased_change(g.modules[n], A, B, A0, B0, cfg.scale(int(A.shape[0])),
                                    cfg.scale(int(A0.shape[0])), s)
        return out
