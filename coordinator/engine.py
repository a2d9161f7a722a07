"""The one round engine: what each device downloads, one upload validator, the streaming fold,
the next global. The gRPC coordinator, the Flower strategy and the benchmarks all run rounds
through it, so they share one code path per method (`coordinator.methods`).

Memory is O(global state), not O(devices x adapter): per module one streaming aggregator of the
method's kind, plus a float64 running weighted sum of the non-LoRA extras. A batch aggregation
is "fold every upload"; a restarted coordinator re-folds its stored uploads one at a time.

    engine = RoundEngine(method, g, round_id, policy=RoundPolicy(...), opt_state=state)
    sent = engine.download(rank, mode, seed)          # tensors a device trains from
    engine.accept(device_id, upload, examples, sent, mode, progress=p)   # validate + fold
    g, metrics = engine.close()                       # finalise + server optimizer

Weights come from the round policy (`coordinator.round_policy`): tempered/capped examples; a ZO
device's upload is held until the close and weighted by its loss progress relative to the LoRA
devices' (O(ZO devices x adapter) memory, ZO devices are the few small ones).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from protos.adapter import A_SUFFIX, B_SUFFIX, CONTRACT_META, RECIPE_META, State
from protos.wire import BASE_DELTA, decode_tensors, encode_tensors, split_download

from . import slora
from .aggregation import GlobalState, LoraUpdate, split_state, zo_replay_update
from .methods import Method
from .round_policy import RoundPolicy
from .server_opt import ServerOptState, apply_server_opt, interpolate
from .validation import UpdateInvalid, validate_update


class RoundEngine:
    """One round's downloads and running aggregate over `method`, starting from global `g`."""

    def __init__(self, method: Method, g: GlobalState, round_id: int, norm_bound: float = math.inf,
                 policy: RoundPolicy | None = None, opt_state: ServerOptState | None = None) -> None:
        self.method, self.g, self.round_id, self.norm_bound = method, g, round_id, norm_bound
        self.policy = policy or RoundPolicy()
        self.opt_state = opt_state if opt_state is not None else ServerOptState()
        self.devices: set[str] = set()
        self._zo_held: list[tuple] = []  # (id, state, weight, progress, what it downloaded, trust)
        self._progress: list[float] = []  # loss progress of the folded LoRA devices
        self._trust: list[float] = []  # each folded device's trust (RoundPolicy.trust; ZO: x its progress factor)
        self._modules = {name: method.aggregator() for name in g.modules}
        self._extra: dict[str, torch.Tensor] = {}  # key -> sum_k w_k extra_k (float64)
        self.total_weight = 0.0

    @property
    def count(self) -> int:
        return len(self.devices)

    # -- downloads -------------------------------------------------------------------------
    def download(self, rank: int, mode: str, seed: int, kept: Mapping[str, torch.Tensor] | None = None) -> State:
        """The tensors a device of `rank` running `mode` downloads: its adapter (peft keys), the
        extras, `base_delta.*` factors to merge, and what the coordinator kept for it (`kept`)."""
        served = self.method.serve(self.g, rank, seed)
        out: State = {}
        for name, u in served.adapter.items():
            out[name + A_SUFFIX] = u.A.contiguous()
            if u.B is not None:
                out[name + B_SUFFIX] = u.B.contiguous()
        out.update({k: v.clone() for k, v in self.g.extra.items()})
        for key, t in (kept or {}).items():
            ref = out.get(key[: -len(B_SUFFIX)] + A_SUFFIX) if key.endswith(B_SUFFIX) else None
            mod = self.g.modules.get(key[: -len(B_SUFFIX)]) if ref is not None else None
            if key not in out and mod is not None and tuple(t.shape) == (mod.shape[0], ref.shape[0]):
                out[key] = t.clone()
        for key in [k for k in out if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX not in out]:
            if not self.method.device_contract(mode, self.round_id).is_local(key[: -len(A_SUFFIX)] + B_SUFFIX):  # nothing kept yet
                out[key[: -len(A_SUFFIX)] + B_SUFFIX] = torch.zeros(self.g.modules[key[: -len(A_SUFFIX)]].shape[0],
                                                                    out[key].shape[0])
        for name, (B, A) in served.base_delta.items():
            out[BASE_DELTA + name + ".B"], out[BASE_DELTA + name + ".A"] = B, A
        return out

    def blob(self, tensors: Mapping[str, torch.Tensor], rank: int, mode: str) -> bytes:
        """A download's wire bytes (float32 safetensors; the device contract in the metadata)."""
        cfg = self.method.cfg
        meta = {"strategy": self.method.name, "rank": rank, "lora_alpha": cfg.lora_alpha,
                "use_rslora": int(cfg.use_rslora), "round_id": self.round_id,
                CONTRACT_META: self.method.device_contract(mode, self.round_id).to_meta(),
                RECIPE_META: self.policy.recipe(self.round_id, self.method.lr_factor).to_meta()}
        return encode_tensors(tensors, meta, "fp32")

    def kept_from(self, final: Mapping[str, torch.Tensor], mode: str) -> State:
        """What the coordinator keeps of a device's accepted state to hand back next round."""
        suffixes = self.method.coordinator_keeps(mode)
        return {k: v for k, v in final.items() if any(k.endswith(s) for s in suffixes)}

    # -- uploads ---------------------------------------------------------------------------
    def validate(self, state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], mode: str,
                 precision: str | None = None) -> float:
        """The one upload validator: keys/shapes against what was sent, finite, norm. Returns the norm."""
        return validate_update(state, self.method.expected_upload(state, sent, mode, self.round_id), self.norm_bound,
                               precision)

    def accept(self, device_id: str, state: Mapping[str, torch.Tensor], examples: float,
               sent: Mapping[str, torch.Tensor], mode: str, precision: str | None = None,
               progress: float | None = None, loss: float | None = None) -> float:
        """Validate an upload against what the device downloaded, then fold it. Returns its norm."""
        norm = self.validate(state, sent, mode, precision)
        self.fold(device_id, state, examples, mode, progress, sent, loss)
        return norm

    @staticmethod
    def replay_zo(sent: Mapping[str, torch.Tensor], pairs: Sequence[tuple[int, float]], lr: float) -> State:
        """A ZO device's final adapter from exactly what it downloaded (base delta excluded)."""
        start, _ = split_download(sent)
        return zo_replay_update(start, pairs, lr)

    def fold(self, device_id: str, state: Mapping[str, torch.Tensor], examples: float, mode: str = "lora",
             progress: float | None = None, sent: Mapping[str, torch.Tensor] | None = None,
             loss: float | None = None) -> None:
        """Fold one validated upload (ZO: the replayed final adapter) with the policy's weight for
        `examples` and the device's mean training `loss` (RoundPolicy.weight); a ZO device with a reported `progress` is held until the close. `sent`: what the
        device downloaded, so that its change is folded (`Method.updates`); None: what the method
        serves a device of its rank."""
        if device_id in self.devices:
            raise UpdateInvalid("duplicate", f"device {device_id} was already folded into round {self.round_id}")
        if not examples > 0:
            raise UpdateInvalid("malformed", f"device {device_id}: example count must be positive, got {examples}")
        weight = self.policy.weight(examples, loss)
        trust = self.policy.trust(loss)
        if mode == "zo" and progress is not None and self.policy.zo_progress:
            self._zo_held.append((device_id, dict(state), weight, float(progress), sent, trust))
            self.devices.add(device_id)
            return
        self._fold(device_id, state, weight, sent)
        self._trust.append(trust)
        if progress is not None and mode != "zo":
            self._progress.append(float(progress))

    def _fold(self, device_id: str, state: Mapping[str, torch.Tensor], weight: float,
              sent: Mapping[str, torch.Tensor] | None = None) -> None:
        try:
            mods, extra = split_state(self.method.complete_upload(state, self.g, self.round_id))
            start = None if sent is None else split_download(sent)[0]
            updates = self.method.updates(mods, self.g, start)
            weight = float(weight) * self.method.weight_factor(mods)
        except (ValueError, KeyError) as e:
            raise UpdateInvalid("keys", f"device {device_id}: {e}") from e
        if set(mods) != set(self._modules):
            raise UpdateInvalid("keys", f"device {device_id}: LoRA modules differ from the global's "
                                        f"(missing {sorted(set(self._modules) - set(mods))[:3]})")
        if self._extra and set(extra) != set(self._extra):
            raise UpdateInvalid("keys", f"device {device_id}: non-LoRA keys differ from the first upload's")
        for k, t in extra.items():
            if not bool(torch.isfinite(t).all()):
                raise UpdateInvalid("non_finite", f"device {device_id}: {k} contains non-finite values")
        for name, u in updates.items():
            try:
                self._modules[name].add(LoraUpdate(A=u.A, B=u.B, scale=u.scale, weight=float(weight)))
            except ValueError as e:
                raise UpdateInvalid("shape", f"device {device_id}, module {name!r}: {e}") from e
        for k, t in extra.items():
            w = float(weight) * t.to(torch.float64)
            self._extra[k] = w if k not in self._extra else self._extra[k] + w
        self.devices.add(device_id)
        self.total_weight += float(weight)

    def _fold_held_zo(self) -> dict[str, float]:
        """Fold the held ZO uploads, each weighted by its progress relative to the LoRA devices'."""
        if self._progress:  # a round of ZO devices only uses the last round's reference
            self.opt_state.progress_ref = sum(self._progress) / len(self._progress)
        factors = {}
        for device_id, state, weight, progress, sent, trust in self._zo_held:
            factors[device_id] = self.policy.zo_factor(progress, self.opt_state.progress_ref)
            self.devices.discard(device_id)
            self._fold(device_id, state, weight * factors[device_id], sent)
            self._trust.append(trust * factors[device_id])
        self._zo_held = []
        return factors

    # -- the next global -------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the running aggregate (independent of the number of devices folded)."""
        n = sum(t.numel() * t.element_size() for t in self._extra.values())
        return n + sum(agg.nbytes() for agg in self._modules.values())

    def close(self) -> tuple[GlobalState, dict[str, float]]:
        """(next global, metrics) from the folded uploads and the round's starting global."""
        if not self.devices:
            raise ValueError(f"round {self.round_id}: no uploads were folded; nothing to aggregate")
        zo_factors = self._fold_held_zo()
        W = self.total_weight
        metrics = {"stream_rank": max((a.current_rank for a in self._modules.values()), default=0),
                   "stream_rel_error": max((a.relative_error for a in self._modules.values()), default=0.0)}
        extra = {k: (v / W).float() for k, v in sorted(self._extra.items())}
        steps = {name: agg.result() for name, agg in sorted(self._modules.items())}
        agg, metrics["recompress_rel_error"] = self.method.next_global(self.g, steps, extra, W, self.round_id)
        if zo_factors:
            metrics["zo_weight_factor"] = min(zo_factors.values())
        metrics["round_step"] = step = self.policy.round_step(self._trust)
        if step < 1.0:  # every device here had little to teach: move part of the way
            agg = interpolate(self.g, agg, step, self.method.factor_space, self.method.cfg.cap_rank)
        cfg = self.policy.server_opt
        nxt = apply_server_opt(cfg, self.opt_state, self.g, agg, self.method.factor_space, self.method.cfg.cap_rank)
        return slora.after_round(self.method, self.round_id, self.g, nxt), metrics  # SLoRA's switch, if due


# -- global state <-> bytes -----------------------------------------------------------------
def global_to_bytes(g: GlobalState) -> bytes:
    tensors: State = {}
    mods = {}
    for name, u in g.modules.items():
        tensors[name + A_SUFFIX], tensors[name + B_SUFFIX] = u.A, u.B
        mods[name] = [u.scale, u.weight]
    tensors.update(g.extra)
    for name, u in g.base.items():  # the residual folded into every base (FedEx-LoRA), scale 1
        tensors[BASE_DELTA + name + ".B"], tensors[BASE_DELTA + name + ".A"] = u.B * u.scale, u.A
    meta = {"strategy": g.strategy, "modules": json.dumps(mods), "total_weight": g.total_weight}
    return encode_tensors(tensors, meta)


def global_from_bytes(data: bytes) -> GlobalState:
    tensors, meta = decode_tensors(data)
    mods = json.loads(meta["modules"])
    modules = {name: LoraUpdate(A=tensors.pop(name + A_SUFFIX), B=tensors.pop(name + B_SUFFIX), scale=float(s),
                                weight=float(w)) for name, (s, w) in mods.items()}
    rest, base = split_download(tensors)
    return GlobalState(strategy=meta["strategy"], modules=modules, extra=rest,
                       total_weight=float(meta.get("total_weight", 1.0)),
                       base={n: LoraUpdate(A=A, B=B, scale=1.0) for n, (B, A) in base.items()})


def aggregate(method: Method, g: GlobalState, uploads: Sequence[tuple[str, Mapping[str, torch.Tensor], float]],
              round_id: int = 0, policy: RoundPolicy | None = None) -> GlobalState:
    """Batch aggregation = fold every (device_id, state, examples) upload, then close (no validation;
    default `RoundPolicy.plain()`: weights = examples, no server optimizer)."""
    engine = RoundEngine(method, g, round_id, policy=policy or RoundPolicy.plain())
    for device_id, state, examples in uploads:
        engine.fold(device_id, state, examples)
    return engine.close()[0]
