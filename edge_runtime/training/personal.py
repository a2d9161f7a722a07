"""Personalized LoRA (FedDPA-style dual adapters): a device trains the global adapter and a personal
one side by side, both applied; only the global one leaves the device.

Both live in one peft LoRA of rank r + L per module: slots [:r] are the global adapter as
downloaded (rank r, scale s_r), slots [r:] the device's personal adapter (rank L, kept on the
device between rounds; a fresh peft init at first: A random, B zero). One scale s_{r+L} applies to
the whole adapter, so the downloaded B is rescaled on the way in (s_r / s_{r+L}) and back on the way
out: s_{r+L} (B_g A_g + B_p A_p) = s_r B A + s_{r+L} B_p A_p. The download's `DeviceContract`
carries L (`personal_rank`; 0: off); the device runtime never branches on a method's name.
"""
from __future__ import annotations

from collections.abc import Mapping

from protos.adapter import A_SUFFIX, B_SUFFIX, State

PERSONAL = "personal."  # key prefix of the personal slots in what a device keeps


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (rank ** 0.5 if use_rslora else rank)


def personal_ratio(alpha: float, rank: int, personal: int, use_rslora: bool) -> float:
    """s_r / s_(r+L): the global adapter's scale (rank r) over the scale of the whole adapter a device
    trains (r global slots + L personal ones), used to move B between the two scales."""
    return lora_scale(alpha, rank, use_rslora) / lora_scale(alpha, rank + personal, use_rslora)


def with_personal(download: Mapping[str, "object"], fresh: Mapping[str, "object"], kept: Mapping[str, "object"],
                  rank: int, ratio: float) -> State:
    """The rank r + L adapter state to load.

    download: the global at rank r (A (r, in), B (out, r)) plus non-LoRA keys; fresh: the trainer's
    freshly configured state at rank r + L (its slots [r:] are the personal adapter's first init);
    kept: `PERSONAL + key` -> the personal slots from the last round (A (L, in), B (out, L)), used
    when their shape fits; ratio: s_r / s_{r+L} (the downloaded B is multiplied by it)."""
    import torch

    out: State = {}
    for key, cur in fresh.items():
        got = download.get(key)
        if key.endswith(A_SUFFIX) or key.endswith(B_SUFFIX):
            is_a = key.endswith(A_SUFFIX)
            mine = kept.get(PERSONAL + key)
            tail = cur[rank:] if is_a else cur[:, rank:]
            if mine is not None and tuple(mine.shape) == tuple(tail.shape):
                tail = mine
            head = got if is_a else got * ratio
            out[key] = torch.cat([head, tail], dim=0 if is_a else 1).contiguous()
        else:
            out[key] = got if got is not None else cur
    return out


def split_personal(state: Mapping[str, "object"], rank: int, ratio: float) -> tuple[State, State]:
    """(the global adapter at rank r to upload, `PERSONAL + key` -> the personal slots to keep).

    state: the trained rank r + L adapter; ratio: s_r / s_{r+L} (the uploaded B is divided by it)."""
    up: State = {}
    keep: State = {}
    for key, t in state.items():
        if key.endswith(A_SUFFIX):
            up[key], keep[PERSONAL + key] = t[:rank].clone(), t[rank:].clone()
        elif key.endswith(B_SUFFIX):
            up[key], keep[PERSONAL + key] = (t[:, :rank] / ratio).clone(), t[:, rank:].clone()
        else:
            up[key] = t
    return up, keep


def without_personal(state: Mapping[str, "object"], rank: int) -> State:
    """`state` with the personal slots' B zeroed: the global model alone (for comparing accuracies)."""
    out = dict(state)
    for key, t in state.items():
        if key.endswith(B_SUFFIX):
            z = t.clone()
            z[:, rank:] = 0
            out[key] = z
    return out
