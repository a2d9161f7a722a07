"""What every aggregation method is: a config, and a `Method` whose hooks the round engine calls.

A method decides, for its own global state (`GlobalState.modules`, one `LoraUpdate` per module):
- `initial`: the round-1 global from a peft state dict at max_rank (A random, B zero, head);
- `serve`: what a device of rank r trains from (its adapter, and optionally a base delta to merge);
- `contract` / `upload_shapes` / `complete_upload`: what a device keeps, what it must upload,
  and how an upload becomes a full adapter state before folding;
- `aggregator` + `finalise`: the streaming fold of one module and the next global from it
  (a batch aggregation is "fold every upload": there is no second code path);
- `deltas`: what the global adds to the base weights (evaluation, export);
- secure aggregation: `secagg_refusal` (why it cannot run, or None) and `shares_b`.

Subclasses override only what differs from the default below (one common rank, plain average).
The pure maths lives in `coordinator.aggregation`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract, State, module_of

from .. import slora
from ..aggregation import GlobalState, LoraUpdate, StreamingAggregator, lora_scale, split_state, to_scale, truncate


INITS = ("random", "federa", "slora")  # how the round-1 global's LoRA factors start (coordinator.init_global)


@dataclass(frozen=True)
class MethodConfig:
    """The knobs every method shares. cap_rank: the largest rank a factor-space global keeps."""

    name: str
    max_rank: int
    lora_alpha: float = 16.0
    use_rslora: bool = False
    cap_rank: int = 64
    prune_threshold: float = 0.0  # rank self-pruning (methods with `prunes_rank`): see protos.adapter.DeviceContract
    init: str = "random"  # "random": peft's init (A kaiming, B 0); "federa": SVD of the base weights (init_global)
    slora_rounds: int = 0  # init "slora": rounds of the sparse stage before LoRA (coordinator.slora)
    slora_density: float = 0.0  # init "slora": share of each LoRA module's base weight entries trained in it
    slora_seed: int = 0  # init "slora": the sparse mask's seed (protos.sparse)

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.cap_rank < self.max_rank:
            raise ValueError(f"need 1 <= max_rank ({self.max_rank}) <= cap_rank ({self.cap_rank})")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if self.init not in INITS:
            raise ValueError(f"--init / init {self.init!r}: choose one of {', '.join(INITS)}")
        self._check_slora()
        if not (math.isfinite(self.prune_threshold) and 0.0 <= self.prune_threshold < 1.0):
            raise ValueError(f"--prune-threshold / prune_threshold must be in [0, 1) (0 = off), got "
                             f"{self.prune_threshold}")

    def _check_slora(self) -> None:
        if self.init != "slora":
            if self.slora_rounds or self.slora_density:
                raise ValueError(f"--slora-rounds {self.slora_rounds} / --slora-density {self.slora_density} are "
                                 f"SLoRA's options; they need --init slora (got --init {self.init})")
            return
        if not (isinstance(self.slora_rounds, int) and 1 <= self.slora_rounds <= 1000):
            raise ValueError(f"--init slora needs --slora-rounds N: the sparse rounds before LoRA, an integer in "
                             f"[1, 1000], got {self.slora_rounds!r}")
        if not (math.isfinite(self.slora_density) and 0.0 < self.slora_density <= 0.5):
            raise ValueError(f"--init slora needs --slora-density D: the share of each LoRA module's base weight "
                             f"entries trained in the sparse stage, in (0, 0.5] (e.g. 0.02), got {self.slora_density}")

    def scale(self, rank: int) -> float:
        return lora_scale(self.lora_alpha, rank, self.use_rslora)


@dataclass(frozen=True)
class Served:
    """What one device of rank r trains from: its adapter per module, and a base delta to merge.

    adapter: module -> LoraUpdate at the device's rank and scale (B None: the device keeps its own).
    base_delta: module -> (B (out, R) with the scale folded in, A (R, in)), merged as W += B @ A.
    """

    adapter: dict[str, LoraUpdate]
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _with(flag: str) -> str:
    """The registered method names whose class attribute `flag` is true, comma-separated."""
    from .registry import METHODS

    return ", ".join(n for n, c in METHODS.items() if getattr(c, flag))


class Method:
    """Default behaviour: one global adapter at max_rank that every device trains (FedIT)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    common_rank: ClassVar[bool] = True  # every device trains the global rank
    all_zo: ClassVar[bool] = False  # every device trains zeroth-order
    shares_b: ClassVar[bool] = True  # B leaves the device (False: only A and the head are aggregated)
    factor_space: ClassVar[bool] = False  # the global is a factor-space sum capped at cap_rank
    secagg_refusal: ClassVar[str | None] = None  # why secure aggregation cannot run it (None: it can)
    prunes_rank: ClassVar[bool] = False  # devices may upload below their served rank (rank self-pruning)
    serves_base: ClassVar[bool] = True  # `serve` sends GlobalState.base and `deltas` includes it (FeDeRA's residual)
    lr_factor: ClassVar[float] = 1.0  # x the round's learning rate for this method's PEFT tensors (recipe lr_scale; the head: 1x)
    peft: ClassVar[str] = "lora"  # the PEFT type devices train (protos.peft_names.PEFT_TYPES; the contract carries it)
    virtual_tokens: ClassVar[int] = 0  # prompt tuning's prompt length (peft "prompt")
    bottleneck: ClassVar[int] = 0  # the bottleneck adapters' width (peft "adapter")

    def __init__(self, cfg: MethodConfig) -> None:
        if cfg.prune_threshold and not self.prunes_rank:
            raise ValueError(f"--prune-threshold {cfg.prune_threshold}: strategy {cfg.name!r} trains fixed ranks; "
                             f"rank self-pruning needs one of: {_with('prunes_rank')} "
                             "(or leave --prune-threshold at 0)")
        if cfg.init != "random" and not self.serves_base:
            raise ValueError(f"--init {cfg.init}: strategy {cfg.name!r} does not send a residual base to devices; "
                             f"an SVD initialisation needs one of: {_with('serves_base')} (or --init random)")
        if cfg.init == "slora" and self.all_zo:
            raise ValueError(f"--init slora: strategy {cfg.name!r} trains zeroth-order only; SLoRA's sparse stage "
                             "needs first-order devices (choose a LoRA strategy, or --init random)")
        self.cfg = cfg

    # -- global state ----------------------------------------------------------------------
    def initial(self, init_state: Mapping[str, torch.Tensor]) -> GlobalState:
        """The round-1 global from a peft state dict at max_rank."""
        modules, extra = split_state(init_state)
        s = self.cfg.scale(self.cfg.max_rank)
        mods = {}
        for name, (A, B) in sorted(modules.items()):
            if A.shape[0] != self.cfg.max_rank:
                raise ValueError(f"initial adapter module {name!r} has rank {A.shape[0]}, "
                                 f"expected max_rank {self.cfg.max_rank}")
            mods[name] = self.initial_module(A.float().clone(), B.float().clone(), s)
        return GlobalState(self.name, mods, {k: v.float().clone() for k, v in extra.items()})

    def initial_module(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> LoraUpdate:
        return LoraUpdate(A=A, B=B, scale=scale)

    def global_rank(self) -> int:
        """Rank of the global factors (defences compare updates in this space)."""
        return self.cfg.cap_rank if self.factor_space else self.cfg.max_rank

    def deltas(self, g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> (B (out, r) with the scale folded in, A (r, in)): what the global adds to W."""
        out = {}
        for n, u in g.modules.items():
            B, A, b = u.B * u.scale, u.A, g.base.get(n)
            if b is not None:  # a residual folded into every base (FeDeRA's -B0 A0)
                B, A = torch.cat([B, b.B * b.scale], dim=1), torch.cat([A, b.A])
            out[n] = (B, A)
        for n, (Bd, Ad) in slora.sparse_deltas(self.cfg, g).items():  # SLoRA's sparse delta as exact factors
            out[n] = (torch.cat([out[n][0], Bd], dim=1), torch.cat([out[n][1], Ad]))
        return out

    @staticmethod
    def base_delta(g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> (B (out, R) scale folded, A (R, in)): `GlobalState.base`, merged into every device's base."""
        return {n: ((u.B.double() * u.scale).float(), u.A.clone()) for n, u in g.base.items()}

    # -- downloads -------------------------------------------------------------------------
    def device_mode(self, plan_mode: str) -> str:
        """What a device runs under this method: its plan's mode unless the method decides."""
        return plan_mode

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        """What a device of `rank` trains from (the default: the global at its scale)."""
        s = self.cfg.scale(rank)
        out = {}
        for name, u in g.modules.items():
            if u.rank != rank:
                raise ValueError(f"module {name!r}: {self.name} keeps one rank ({u.rank}); cannot serve rank {rank}")
            out[name] = to_scale(u, s)
        return Served(out, self.base_delta(g))

    def serve_slices(self, g: GlobalState, rank: int) -> Served:
        """Zero-padding's download (HetLoRA): rows [:r] of A, columns [:, :r] of B, at the device's scale."""
        s = self.cfg.scale(rank)
        return Served({n: to_scale(truncate(u, rank), s) for n, u in g.modules.items()}, self.base_delta(g))

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        """What the device keeps local / frozen in `round_id` (see protos.adapter)."""
        return DeviceContract()

    def device_contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        """What a download carries (not overridden): `contract`, with SLoRA's stage (coordinator.slora)."""
        return slora.stage_contract(self.cfg, round_id, self.contract(mode, round_id))

    def coordinator_keeps(self, mode: str) -> tuple[str, ...]:
        """Key suffixes of a device's replayed state that the coordinator hands back next round
        (a device that cannot keep them itself, e.g. a ZO device under FedSA-LoRA)."""
        return ()

    def upload_shapes(self, download: Mapping[str, torch.Tensor], mode: str,
                      round_id: int = 0) -> dict[str, tuple[int, ...]]:
        """Key -> shape an upload must have: the downloaded adapter's, less what the device keeps."""
        keep = self.device_contract(mode, round_id)
        return {k: tuple(v.shape) for k, v in download.items()
                if not k.startswith("base_delta.") and keep.uploads(k)}

    def expected_upload(self, state: Mapping[str, torch.Tensor], download: Mapping[str, torch.Tensor], mode: str,
                        round_id: int = 0) -> dict[str, tuple[int, ...]]:
        """Key -> shape the upload `state` must have (the one validator's reference): `upload_shapes`
        (a method whose devices may prune their rank accepts a lower one)."""
        return self.upload_shapes(download, mode, round_id)

    def complete_upload(self, state: Mapping[str, torch.Tensor], g: GlobalState, round_id: int = 0) -> State:
        """A full adapter state (A and B per module) from an accepted upload."""
        return dict(state)

    def updates(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]], g: GlobalState,
                start: Mapping[str, torch.Tensor] | None) -> dict[str, LoraUpdate]:
        """Module -> what is folded for one device. mods: module -> (A (r, in), B (out, r)) it uploaded;
        start: the adapter it downloaded (None: what `serve` gives a device of its rank).

        Default (a fixed-shape global): the device's CHANGE rebased on the global at max rank, i.e.
        A = G.A + pad(A_k - A0_k), B = G.B + pad(B_k - B0_k) * s_k / s (at the max-rank scale s), so a
        device of rank r < max_rank moves only the slots it trained and never dilutes the others
        with zeros (plain zero-padding shrinks slots >= r by the weight of the low-rank devices)."""
        cfg = self.cfg
        s = cfg.scale(cfg.max_rank)
        out = {}
        starts = starts_of(self, g, mods, start)
        for n, (A, B) in mods.items():
            r, s_k = int(A.shape[0]), cfg.scale(int(A.shape[0]))
            G = g.modules[n]
            A0, B0 = starts[n]
            B0 = torch.zeros_like(B) if B0 is None else B0
            A_new = G.A.double().clone()
            B_new = (G.B.double() * (G.scale / s)).clone()
            A_new[:r] += A.double() - A0.double()
            B_new[:, :r] += (B.double() - B0.double()) * (s_k / s)
            out[n] = LoraUpdate(A=A_new.float(), B=B_new.float(), scale=s)
        return out

    def weight_factor(self, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """A factor on one device's aggregation weight from what it uploaded (module -> (A (r, in),
        B (out, r))); 1: the round policy's weight alone."""
        return 1.0

    # -- aggregation -----------------------------------------------------------------------
    def aggregator(self) -> StreamingAggregator:
        """A fresh per-module streaming aggregator for one round."""
        return StreamingAggregator("mean")

    def next_global(self, g: GlobalState, steps: Mapping[str, Any], extra: dict[str, torch.Tensor], weight: float,
                    round_id: int = 0) -> tuple[GlobalState, float]:
        """(the next global, the largest relative recompression error) from every module's folded step."""
        mods, err = {}, 0.0
        for name, step in steps.items():
            mods[name], e = self.finalise(g.modules[name], step, round_id)
            err = max(err, e)
        return replace(g, strategy=self.name, modules=mods, extra=extra, total_weight=weight), err

    def finalise(self, old: LoraUpdate, step: LoraUpdate, round_id: int = 0) -> tuple[LoraUpdate, float]:
        """(next global module from the old one and this round's folded step, relative error)."""
        return step, 0.0


def fill_zero_b(state: Mapping[str, torch.Tensor], g: GlobalState) -> State:
    """`state` with a zero B (out, r) for every module that uploaded only A."""
    out = dict(state)
    for key, t in state.items():
        if key.endswith(A_SUFFIX):
            mod = module_of(key)
            out.setdefault(mod + B_SUFFIX, torch.zeros(g.modules[mod].shape[0], t.shape[0]))
    return out


def starts_of(method: Method, g: GlobalState, mods: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              start: Mapping[str, torch.Tensor] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Module -> (A0 (r, in), B0 (out, r) or None) a device started from: its download, or (not
    given) what the method serves its rank (served once per rank, not once per module)."""
    out, served = {}, {}
    for name, (A, _) in mods.items():
        if start is not None and name + A_SUFFIX in start:
            out[name] = (start[name + A_SUFFIX], start.get(name + B_SUFFIX))
            continue
        r = int(A.shape[0])
        if r not in served:
            served[r] = method.serve(g, r, 0).adapter
        out[name] = (served[r][name].A, served[r][name].B)
    return out
