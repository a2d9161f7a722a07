"""Names and the device contract that both sides share (one home; no method names here).

Adapter state dicts use peft's keys with the adapter name stripped: `<module>.lora_A.weight`
(r, in) and `<module>.lora_B.weight` (out, r); every other key is a trainable non-LoRA tensor
(e.g. a classification head).

A method tells a device what to do with its download through a `DeviceContract`, carried in the
download's safetensors metadata, so the device runtime never branches on a method's name:

- `keep_local`: key suffixes the device keeps on the device: they are not in the download (the
  device reuses its own copy, zeros at first) and not in the upload (e.g. FedSA-LoRA's B).
- `frozen`: key suffixes the device must not train (e.g. FFA-LoRA's A).
- `prune_threshold`: rank self-pruning (HetLoRA): after training, the device drops its trailing rank
  slots while their share of its adapter's product B A stays at most this fraction, uploads at the
  smaller rank and reports it (0: off).
- `personal_rank`: personalized LoRA (FedDPA-style): the device trains a personal adapter of this
  rank next to the global one (both applied), keeps it and uploads only the global one (0: off).
- `peft` / `virtual_tokens` / `bottleneck`: the PEFT type every device trains (`protos.peft_names.
  PEFT_TYPES`: "lora", or prompt tuning / (IA)3 / BitFit / bottleneck adapters, whose adapter state is a
  dict of named tensors, `protos.peft_types`), with prompt tuning's prompt length and the adapters'
  width; the device rebuilds its adapter when it differs from what it holds.
- `sparse_density` / `sparse_seed`: SLoRA's sparse delta (`protos.sparse`): the device adds a delta at a
  fixed random mask (this density, derived from this seed) to every LoRA module's base weight; its
  values travel as `<module>.sparse_delta` tensors next to the adapter (0: off). `frozen` may name
  the `.sparse_delta` suffix (after the switch to LoRA the delta stays, untrained).

The round's `TrainingRecipe` (FedProx mu, logit adjustment, the lr schedule's factor) travels the
same way.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
State = dict[str, torch.Tensor]
CONTRACT_META = "device_contract"


def module_of(key: str) -> str | None:
    """`<module>` of a LoRA key, None for any other key."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


@dataclass(frozen=True)
class DeviceContract:
    """What a device does with a download beyond loading it (see the module docstring)."""

    keep_local: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    prune_threshold: float = 0.0
    personal_rank: int = 0
    peft: str = "lora"
    virtual_tokens: int = 0
    bottleneck: int = 0
    sparse_density: float = 0.0
    sparse_seed: int = 0

    def __post_init__(self) -> None:
        import math

        from .sparse import SPARSE_SUFFIX

        from .peft_names import check_kind

        check_kind(self.peft, self.virtual_tokens, "device contract peft", self.bottleneck)
        if not (isinstance(self.personal_rank, int) and 0 <= self.personal_rank <= 4096):
            raise ValueError(f"device contract personal_rank={self.personal_rank!r}: expected an integer in [0, 4096] "
                             "(0 = no personal adapter)")

        if not (math.isfinite(self.prune_threshold) and 0.0 <= self.prune_threshold < 1.0):
            raise ValueError(f"device contract prune_threshold={self.prune_threshold!r}: expected a number in "
                             "[0, 1) (the largest share of B A the dropped rank slots may carry; 0 = off)")
        if not (math.isfinite(self.sparse_density) and 0.0 <= self.sparse_density <= 1.0):
            raise ValueError(f"device contract sparse_density={self.sparse_density!r}: expected a number in [0, 1] "
                             "(the share of a base weight's entries in the sparse delta; 0 = off)")
        allowed = {"keep_local": (A_SUFFIX, B_SUFFIX), "frozen": (A_SUFFIX, B_SUFFIX, SPARSE_SUFFIX)}
        for field_name, ok in allowed.items():
            bad = [s for s in getattr(self, field_name) if s not in ok]
            if bad:
                raise ValueError(f"device contract {field_name}: {bad} are not key suffixes it may name "
                                 f"({', '.join(map(repr, ok))})")

    def to_meta(self) -> str:
        d: dict = {"keep_local": list(self.keep_local), "frozen": list(self.frozen)}
        if self.prune_threshold:
            d["prune_threshold"] = self.prune_threshold
        if self.personal_rank:
            d["personal_rank"] = self.personal_rank
        if self.peft != "lora":
            d["peft"], d["virtual_tokens"] = self.peft, self.virtual_tokens
        if self.bottleneck:
            d["bottleneck"] = self.bottleneck
        if self.sparse_density:
            d["sparse_density"], d["sparse_seed"] = self.sparse_density, self.sparse_seed
        return json.dumps(d)

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> DeviceContract:
        """The contract in a download's metadata (none: load everything, upload everything)."""
        raw = meta.get(CONTRACT_META)
        if not raw:
            return cls()
        try:
            d = json.loads(raw)
            return cls(keep_local=tuple(d.get("keep_local", ())), frozen=tuple(d.get("frozen", ())),
                       prune_threshold=float(d.get("prune_threshold", 0.0)),
                       personal_rank=int(d.get("personal_rank", 0)),
                       peft=str(d.get("peft", "lora")), virtual_tokens=int(d.get("virtual_tokens", 0)),
                       bottleneck=int(d.get("bottleneck", 0)),
                       sparse_density=float(d.get("sparse_density", 0.0)), sparse_seed=int(d.get("sparse_seed", 0)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"download metadata {CONTRACT_META!r} is not a valid device contract: {raw!r} ({e})") from e

    def is_local(self, key: str) -> bool:
        return any(key.endswith(s) for s in self.keep_local)

    def uploads(self, key: str) -> bool:
        """Whether `key` goes into the upload: not kept local, and not a frozen sparse delta (SLoRA after
        its switch: the coordinator keeps the global's values, `coordinator.slora.after_round`)."""
        from .sparse import SPARSE_SUFFIX

        return not self.is_local(key) and not (key.endswith(SPARSE_SUFFIX) and self.is_frozen(key))

    def is_frozen(self, key: str) -> bool:
        return any(key.endswith(s) for s in self.frozen)


def prepare_download(state: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
                     kept: Mapping[str, torch.Tensor], contract: DeviceContract) -> State:
    """The adapter state to load: the download plus, for `keep_local` keys it lacks, the device's
    kept tensor (when its shape still matches the trainer's `current` one) or zeros."""
    out = dict(state)
    for key, cur in current.items():
        if key in out or not contract.is_local(key):
            continue
        prev = kept.get(key)
        out[key] = prev.clone() if prev is not None and prev.shape == cur.shape else torch.zeros_like(cur)
    return out


def split_upload(state: Mapping[str, torch.Tensor], contract: DeviceContract) -> tuple[State, State]:
    """(what the device uploads, what it keeps on the device) of its trained adapter state."""
    up = {k: v for k, v in state.items() if contract.uploads(k)}
    keep = {k: v for k, v in state.items() if contract.is_local(k)}
    return up, keep


RECIPE_META = "recipe"


@dataclass(frozen=True)
class TrainingRecipe:
    """How a device trains this round, set by the coordinator (carried in the download's metadata).

    prox_mu: FedProx proximal term mu/2 * ||theta - theta_download||^2 on the trainable tensors (0: off).
    logit_adjust: tau of local logit adjustment (FedLC-style): classification logits + tau * log(prior)
        of the device's own labels during training only, so a one-sided shard does not drag the shared
        head to its majority class (0: off).
    lr_scale: the round's learning-rate factor (the coordinator's round-wise schedule x the method's
        lr factor).
    head_lr_scale: the task head's factor (0: lr_scale); a method's lr factor moves its PEFT tensors,
        the head that every PEFT type shares trains at the round's schedule.
    freeze_head: train only the LoRA factors; the task head (a classifier's `modules_to_save`) stays
        at what was downloaded (FedBABU-style: every device fits its features to the same head).
    """

    prox_mu: float = 0.0
    logit_adjust: float = 0.0
    lr_scale: float = 1.0
    freeze_head: bool = False
    head_lr_scale: float = 0.0

    def __post_init__(self) -> None:
        import math

        for name in ("prox_mu", "logit_adjust"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"training recipe {name}={v!r}: expected a finite number >= 0 (0 = off)")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ValueError(f"training recipe lr_scale={self.lr_scale!r}: expected a positive number")
        if not (math.isfinite(self.head_lr_scale) and self.head_lr_scale >= 0):
            raise ValueError(f"training recipe head_lr_scale={self.head_lr_scale!r}: expected a number >= 0 "
                             "(0: as lr_scale)")

    @property
    def head_ratio(self) -> float:
        """The head's learning rate / the other tensors'."""
        return self.head_lr_scale / self.lr_scale if self.head_lr_scale else 1.0

    def to_meta(self) -> str:
        return json.dumps({"prox_mu": self.prox_mu, "logit_adjust": self.logit_adjust, "lr_scale": self.lr_scale,
                           "freeze_head": self.freeze_head, "head_lr_scale": self.head_lr_scale})

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> TrainingRecipe:
        """The recipe in a download's metadata (none: plain local training)."""
        raw = meta.get(RECIPE_META)
        if not raw:
            return cls()
        try:
            d = json.loads(raw)
            floats = {k: float(d[k]) for k in ("prox_mu", "logit_adjust", "lr_scale", "head_lr_scale") if k in d}
            return cls(**floats, freeze_head=bool(d.get("freeze_head", False)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"download metadata {RECIPE_META!r} is not a valid training recipe: {raw!r} ({e})") from e


def loss_factor(loss: float | None, q: float, num_labels: int) -> float:
    """A device's aggregation-weight factor from its mean training loss (q-FFL, Li et al. 2020):
    min(1, loss / ln K) ** q, at least 1e-3; 1 when off (q = 0, K < 2: not classification) or no
    finite loss was reported. One home for the coordinator's policy and secure-aggregation devices."""
    if not q or num_labels < 2 or loss is None or not math.isfinite(float(loss)):
        return 1.0
    return max(1e-3, min(1.0, max(0.0, float(loss)) / math.log(num_labels)) ** q)


def loss_progress(losses: list[float]) -> float:
    """Relative decrease of a device's training loss over its local steps, >= 0: (mean of the first
    third - mean of the last third) / mean of the first third. What a device reports so that the
    coordinator can weight zeroth-order devices by what they learned."""
    xs = [float(x) for x in losses if x == x and abs(x) != float("inf")]
    if len(xs) < 2:
        return 0.0
    k = max(1, len(xs) // 3)
    first, last = sum(xs[:k]) / k, sum(xs[-k:]) / k
    return max(0.0, (first - last) / first) if first > 0 else 0.0
