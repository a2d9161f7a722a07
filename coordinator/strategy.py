"""Per-strategy global state: what each device downloads and how a round's uploads fold in.

The maths lives in `coordinator.aggregation`; this module only chooses and composes it:

- fedavg / zo: one global adapter at the common rank (= max_rank); every device trains it.
- zero_pad: global factors at max_rank; a device of rank r trains the slice [:r].
- svd: the global is the exact aggregate as SVD-ordered factors (capped at `cap_rank`);
  each device gets its own rank's best approximation.
- stack: the global is a cumulative base delta kept as low-rank factors (recompressed by a
  factor SVD to `cap_rank`); devices merge it into their base weights and train a fresh
  adapter each round (FLoRA).
- fedsa: only A is global; LoRA devices keep their B on the device (they upload A and the
  head only); ZO devices get their last B back from the coordinator so replay is exact.

Initial state (round 1): the coordinator instantiates the base model with peft at max_rank
under a fixed seed (`initial_state`), so round 1 has a real global adapter and every device,
ZO ones included, starts from tensors the coordinator knows exactly.

Downloads are float32 safetensors blobs: adapter keys as peft names them, plus
`base_delta.<module>.B` (out, R) / `base_delta.<module>.A` (R, in) for stack (scale folded in).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from coordinator.aggregation import (DeviceState, GlobalState, LoraUpdate, aggregate_state, factor_svd, lora_scale,
                                     slice_for_device, split_state, zo_replay_update)
from coordinator.aggregation.svd import factors_from_svd
from protos.wire import BASE_DELTA, decode_tensors, encode_tensors, split_download

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
STRATEGIES = ("fedavg", "zero_pad", "stack", "svd", "fedsa", "zo")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    max_rank: int
    lora_alpha: float = 16.0
    use_rslora: bool = False
    cap_rank: int = 64  # stack / svd: global factors are recompressed to at most this rank

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {STRATEGIES}")
        if self.max_rank < 1 or self.cap_rank < self.max_rank:
            raise ValueError(f"need 1 <= max_rank ({self.max_rank}) <= cap_rank ({self.cap_rank})")

    def device_mode(self, plan_mode: str) -> str:
        """What a device runs: 'zo' for every device under the zo strategy, else its plan's mode."""
        return "zo" if self.name == "zo" else plan_mode


# -- global state <-> bytes -------------------------------------------------------------------
def global_to_bytes(g: GlobalState) -> bytes:
    tensors: State = {}
    mods = {}
    for name, u in g.modules.items():
        tensors[name + A_SUFFIX], tensors[name + B_SUFFIX] = u.A, u.B
        mods[name] = [u.scale, u.weight]
    tensors.update(g.extra)
    meta = {"strategy": g.strategy, "modules": json.dumps(mods), "total_weight": g.total_weight}
    return encode_tensors(tensors, meta)


def global_from_bytes(data: bytes) -> GlobalState:
    tensors, meta = decode_tensors(data)
    mods = json.loads(meta["modules"])
    modules = {name: LoraUpdate(A=tensors.pop(name + A_SUFFIX), B=tensors.pop(name + B_SUFFIX), scale=float(s),
                                weight=float(w)) for name, (s, w) in mods.items()}
    return GlobalState(strategy=meta["strategy"], modules=modules, extra=tensors,
                       total_weight=float(meta.get("total_weight", 1.0)))


def initial_global(init_state: Mapping[str, torch.Tensor], cfg: StrategyConfig) -> GlobalState:
    """The round-1 global from a peft state dict at max_rank (A random, B zero, head initialised)."""
    modules, extra = split_state(init_state)
    s = lora_scale(cfg.lora_alpha, cfg.max_rank, cfg.use_rslora)
    mods = {}
    for name, (A, B) in sorted(modules.items()):
        if A.shape[0] != cfg.max_rank:
            raise ValueError(f"initial adapter module {name!r} has rank {A.shape[0]}, expected max_rank {cfg.max_rank}")
        if cfg.name == "stack":  # the cumulative base delta starts at zero
            mods[name] = LoraUpdate(A=A.float().clone(), B=torch.zeros_like(B, dtype=torch.float32), scale=1.0)
        else:
            mods[name] = LoraUpdate(A=A.float().clone(), B=B.float().clone(), scale=s)
    return GlobalState(strategy=cfg.name, modules=mods, extra={k: v.float().clone() for k, v in extra.items()})


# -- downloads --------------------------------------------------------------------------------
def download_tensors(g: GlobalState, cfg: StrategyConfig, rank: int, mode: str, seed: int,
                     device_b: Mapping[str, torch.Tensor] | None = None) -> State:
    """The tensors one device downloads (adapter at its rank, extras, stack base delta)."""
    dl = slice_for_device(g, rank, cfg.lora_alpha, cfg.use_rslora, seed=seed)
    out: State = dict(dl.state)
    if cfg.name == "fedsa" and mode == "zo":
        # ZO devices need a full adapter the coordinator knows: their last replayed B (zeros at first)
        for key in list(out):
            if key.endswith(A_SUFFIX):
                bkey = key[: -len(A_SUFFIX)] + B_SUFFIX
                out_dim = g.modules[key[: -len(A_SUFFIX)]].shape[0]
                prev = (device_b or {}).get(bkey)
                out[bkey] = prev.clone() if prev is not None and prev.shape == (out_dim, rank) else torch.zeros(out_dim, rank)
    for name, (B, A) in dl.base_delta.items():
        out[BASE_DELTA + name + ".B"], out[BASE_DELTA + name + ".A"] = B, A
    return out


def download_blob(tensors: Mapping[str, torch.Tensor], cfg: StrategyConfig, rank: int, round_id: int) -> bytes:
    meta = {"strategy": cfg.name, "rank": rank, "lora_alpha": cfg.lora_alpha, "use_rslora": int(cfg.use_rslora),
            "round_id": round_id}
    return encode_tensors(tensors, meta, "fp32")


# -- upload validation ------------------------------------------------------------------------
def expected_upload_shapes(download: Mapping[str, torch.Tensor], cfg: StrategyConfig, mode: str) -> dict[str, tuple]:
    """Key -> shape an upload must have: the downloaded adapter's (fedsa LoRA devices: no B)."""
    state, _ = split_download(download)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if cfg.name == "fedsa" and mode == "lora":
        for key, (out_dim, _) in [(k, s) for k, s in shapes.items() if k.endswith(A_SUFFIX)]:
            shapes.pop(key[: -len(A_SUFFIX)] + B_SUFFIX, None)
    return shapes


def validate_upload(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], norm_bound: float) -> None:
    """Raise ValueError naming the first wrong key / shape / non-finite tensor / norm overflow."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"upload keys do not match the assigned adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    total = 0.0
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k]):
            raise ValueError(f"upload tensor {k} has shape {tuple(t.shape)}, expected {tuple(expected[k])} "
                             "for the assigned rank")
        if not t.is_floating_point():
            raise ValueError(f"upload tensor {k} has dtype {t.dtype}; expected a floating type")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"upload tensor {k} contains non-finite values (nan/inf)")
        total += float(t.double().pow(2).sum())
    if total ** 0.5 > norm_bound:
        raise ValueError(f"upload norm {total ** 0.5:.3g} exceeds the bound {norm_bound:.3g}")


# -- aggregation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundUpload:
    """One accepted update, decoded: the device's final adapter state (ZO: already replayed)."""

    device_id: str
    state: State
    weight: float


def replay_zo(download: Mapping[str, torch.Tensor], pairs: Sequence[tuple[int, float]], lr: float) -> State:
    """The ZO device's final adapter from exactly what it downloaded (base delta excluded)."""
    start, _ = split_download(download)
    return zo_replay_update(start, pairs, lr)


def aggregate_round(g: GlobalState, uploads: Sequence[RoundUpload], cfg: StrategyConfig) -> GlobalState:
    """The next global state from this round's uploads."""
    if not uploads:
        raise ValueError("cannot aggregate a round without accepted uploads")
    devices = []
    for u in uploads:
        state = dict(u.state)
        if cfg.name == "fedsa":  # B never leaves LoRA devices; aggregation only reads A
            for k in [k for k in state if k.endswith(A_SUFFIX)]:
                bkey = k[: -len(A_SUFFIX)] + B_SUFFIX
                if bkey not in state:
                    state[bkey] = torch.zeros(g.modules[k[: -len(A_SUFFIX)]].shape[0], state[k].shape[0])
        devices.append(DeviceState(state=state, alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, weight=u.weight))
    if cfg.name in ("fedavg", "zo"):
        return aggregate_state("fedavg", devices)
    if cfg.name in ("zero_pad", "fedsa"):
        new = aggregate_state(cfg.name, devices, rank=cfg.max_rank)
        return GlobalState(cfg.name, new.modules, new.extra, new.total_weight)
    if cfg.name == "svd":
        new = aggregate_state("svd", devices)
        return GlobalState("svd", {n: recompress(u, cfg.cap_rank) for n, u in new.modules.items()}, new.extra,
                           new.total_weight)
    # stack: cumulative base delta += this round's exact stacked update, recompressed to cap
    new = aggregate_state("stack", devices)
    mods = {}
    for name, old in g.modules.items():
        step = new.modules[name]
        B = torch.cat([old.B * old.scale, step.B * step.scale], dim=1)  # (out, R_old + R_new)
        A = torch.cat([old.A, step.A], dim=0)  # (R_old + R_new, in)
        mods[name] = recompress(LoraUpdate(A=A, B=B, scale=1.0), cfg.cap_rank)
    return GlobalState("stack", mods, new.extra, new.total_weight)


def recompress(u: LoraUpdate, cap: int) -> LoraUpdate:
    """The same update at rank <= cap: exact when rank(B @ A) <= cap, else its best rank-cap approximation."""
    if u.rank <= cap:
        return u
    U, S, Vh = factor_svd(u.B * u.scale, u.A)
    return factors_from_svd(U, S, Vh, cap, 1.0, u.weight)


def effective_deltas(g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> (B (out, r) with the scale folded in, A (r, in)): what the global adds to W.

    fedsa has no global B (devices keep theirs), so it contributes no delta.
    """
    if g.strategy == "fedsa":
        return {}
    return {n: (u.B * u.scale, u.A) for n, u in g.modules.items()}
