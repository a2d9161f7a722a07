"""Names and the device contract that both sides share (one home; no method names here).

Adapter state dicts use peft's keys with the adapter name stripped: `<module>.lora_A.weight`
(r, in) and `<module>.lora_B.weight` (out, r); every other key is a trainable non-LoRA tensor
(e.g. a classification head).

A method tells a device what to do with its download through a `DeviceContract`, carried in the
download's safetensors metadata, so the device runtime never branches on a method's name:

- `keep_local`: key suffixes the device keeps on the device: they are not in the download (the
  device reuses its own copy, zeros at first) and not in the upload (e.g. FedSA-LoRA's B).
- `frozen`: key suffixes the device must not train (e.g. FFA-LoRA's A).
"""
from __future__ import annotations

import json
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

    def __post_init__(self) -> None:
        for field_name in ("keep_local", "frozen"):
            bad = [s for s in getattr(self, field_name) if s not in (A_SUFFIX, B_SUFFIX)]
            if bad:
                raise ValueError(f"device contract {field_name}: {bad} are not LoRA key suffixes "
                                 f"({A_SUFFIX!r} or {B_SUFFIX!r})")

    def to_meta(self) -> str:
        return json.dumps({"keep_local": list(self.keep_local), "frozen": list(self.frozen)})

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> DeviceContract:
        """The contract in a download's metadata (none: load everything, upload everything)."""
        raw = meta.get(CONTRACT_META)
        if not raw:
            return cls()
        try:
            d = json.loads(raw)
            return cls(keep_local=tuple(d.get("keep_local", ())), frozen=tuple(d.get("frozen", ())))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"download metadata {CONTRACT_META!r} is not a valid device contract: {raw!r} ({e})") from e

    def is_local(self, key: str) -> bool:
        return any(key.endswith(s) for s in self.keep_local)

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
    up = {k: v for k, v in state.items() if not contract.is_local(k)}
    keep = {k: v for k, v in state.items() if contract.is_local(k)}
    return up, keep
