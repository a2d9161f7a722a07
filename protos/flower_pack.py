"""How adapter tensors and ZO updates travel inside Flower messages (shared by both sides).

Flower moves a list of numpy arrays (`Parameters` / `ArrayRecord`) plus flat scalar dicts
(`config`, `metrics`, `properties`). Our tensors are named, so every list travels with its
key order as a JSON list under `KEYS` in the accompanying config (server -> device) or
metrics (device -> server). Keys are sorted, so the order is stable and checkable.

- Adapter state: arrays in `sorted(state)` order, keys as peft names them (plus
  `base_delta.<module>.B/.A` for stack downloads, exactly like the gRPC download blob).
- ZO update: two arrays, `zo.seeds` (n,) int64 and `zo.grads` (n,) float64; the learning
  rate goes in metrics under `ZO_LR`.

No flwr import here: this module is pure numpy/torch so the core never needs Flower.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

KEYS = "keys"
ZO_SEEDS, ZO_GRADS, ZO_LR = "zo.seeds", "zo.grads", "zo_lr"
# FitIns config keys (server -> device)
CFG_STRATEGY, CFG_MODE, CFG_RANK, CFG_ALPHA, CFG_RSLORA = "strategy", "mode", "rank", "lora_alpha", "use_rslora"
CFG_TARGETS, CFG_STEPS, CFG_LR, CFG_SEED, CFG_ROUND = "target_modules", "local_steps", "lr", "seed", "round"
CFG_TASK, CFG_LABELS = "task", "num_labels"
CFG_LABEL_WORDS = "label_words"  # JSON list (protos.task); absent or "": the device's default words
CFG_RECIPE = "recipe"  # protos.adapter.TrainingRecipe.to_meta(): FedProx / logit adjustment / lr factor
CFG_CONTRACT = "device-contract"  # protos.adapter.DeviceContract.to_meta(): what the device keeps local / frozen
# get_properties keys (device -> server)
PROP_RANK, PROP_MODE, PROP_PROFILE, PROP_BUDGET = "plan_rank", "mode", "profile", "memory_budget_bytes"
_NP = {"fp32": np.float32, "fp16": np.float16}


class PackError(ValueError):
    """Arrays and their key list do not agree; the message names what is wrong."""


def state_to_arrays(state: Mapping[str, torch.Tensor], precision: str = "fp32") -> tuple[list[np.ndarray], str]:
    """(arrays in sorted key order, JSON key list). precision: 'fp32' or 'fp16' (others send fp32)."""
    keys = sorted(state)
    dtype = _NP.get(precision, np.float32)
    arrays = [state[k].detach().to("cpu", torch.float32).numpy().astype(dtype, copy=True) for k in keys]
    return arrays, json.dumps(keys)


def arrays_to_state(arrays: Sequence[np.ndarray], keys_json: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Inverse of `state_to_arrays`: float32 CPU tensors keyed by name."""
    keys = decode_keys(keys_json)
    if len(keys) != len(arrays):
        raise PackError(f"got {len(arrays)} arrays for {len(keys)} keys; the sender must send one array per key "
                        f"in the order of its '{KEYS}' list")
    out = {}
    for k, a in zip(keys, arrays):
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise PackError(f"array for {k!r} has dtype {a.dtype}; expected a floating type")
        out[k] = torch.from_numpy(a.astype(np.float32, copy=True))
    return out


def decode_keys(keys_json: str | Sequence[str]) -> list[str]:
    """The key list from its JSON form; raises PackError on anything but a list of unique strings."""
    try:
        keys = json.loads(keys_json) if isinstance(keys_json, (str, bytes)) else list(keys_json)
    except json.JSONDecodeError as e:
        raise PackError(f"'{KEYS}' is not valid JSON: {e}") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise PackError(f"'{KEYS}' must be a JSON list of tensor names, got {type(keys).__name__}")
    if len(set(keys)) != len(keys):
        raise PackError(f"'{KEYS}' lists a tensor name twice")
    return keys


def zo_to_arrays(pairs: Sequence[tuple[int, float]]) -> tuple[list[np.ndarray], str]:
    """[(seed, projected gradient), ...] -> ([seeds int64 (n,), grads float64 (n,)], JSON keys)."""
    seeds = np.asarray([int(s) for s, _ in pairs], dtype=np.int64)
    grads = np.asarray([float(g) for _, g in pairs], dtype=np.float64)
    return [seeds, grads], json.dumps([ZO_SEEDS, ZO_GRADS])


def arrays_to_zo(arrays: Sequence[np.ndarray], keys_json: str | Sequence[str]) -> list[tuple[int, float]]:
    """Inverse of `zo_to_arrays`; raises PackError on a malformed ZO update."""
    keys = decode_keys(keys_json)
    if keys != [ZO_SEEDS, ZO_GRADS] or len(arrays) != 2:
        raise PackError(f"a ZO update is two arrays keyed {[ZO_SEEDS, ZO_GRADS]}, got keys {keys[:3]} "
                        f"and {len(arrays)} arrays")
    seeds, grads = np.asarray(arrays[0]), np.asarray(arrays[1])
    if seeds.ndim != 1 or seeds.shape != grads.shape or seeds.size == 0:
        raise PackError(f"ZO seeds {seeds.shape} and grads {grads.shape} must be equal-length non-empty vectors")
    if not np.issubdtype(seeds.dtype, np.integer):
        raise PackError(f"ZO seeds have dtype {seeds.dtype}; expected integers")
    if not np.isfinite(grads.astype(np.float64)).all():
        raise PackError("ZO projected gradients contain non-finite values")
    return [(int(s), float(g)) for s, g in zip(seeds.tolist(), grads.astype(np.float64).tolist())]
