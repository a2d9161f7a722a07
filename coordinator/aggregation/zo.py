"""Zeroth-order (MeZO / FedKSeed) updates: exact replay of (seed, g) pairs, then averaging.

A ZO device uploads [(seed, projected_gradient), ...] and its learning rate; the
coordinator replays them from the exact tensors it sent that device (`protos.zo.replay`)
to get the device's final parameters, which are then aggregated like any other update.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from protos.zo import replay

State = dict[str, torch.Tensor]


def zo_replay_update(start: Mapping[str, torch.Tensor], pairs: Sequence[tuple[int, float]], lr: float) -> State:
    """The device's parameters after its ZO steps: start (name -> tensor) plus the replay."""
    if not start:
        raise ValueError("zeroth-order replay needs the starting parameters; got an empty state")
    if not (isinstance(lr, (int, float)) and torch.isfinite(torch.tensor(float(lr)))):
        raise ValueError(f"zeroth-order learning rate must be a finite number, got {lr!r}")
    return replay(start, list(pairs), float(lr))


def weighted_state_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_k p_k state_k for states with identical keys and shapes (float32 out)."""
    if not states:
        raise ValueError("no states to average: the list is empty")
    if len(weights) != len(states):
        raise ValueError(f"got {len(weights)} weights for {len(states)} states")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and w > 0 and torch.isfinite(torch.tensor(float(w)))):
            raise ValueError(f"state {i}: weight must be a finite positive number, got {w!r}")
    keys = set(states[0])
    for i, s in enumerate(states):
        if set(s) != keys:
            raise ValueError(f"state {i}: keys differ from state 0's (missing {sorted(keys - set(s))[:3]}, "
                             f"extra {sorted(set(s) - keys)[:3]})")
        for k in keys:
            if tuple(s[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"state {i}: {k} has shape {tuple(s[k].shape)}, state 0 has {tuple(states[0][k].shape)}")
            if not bool(torch.isfinite(s[k]).all()):
                raise ValueError(f"state {i}: {k} contains non-finite values")
    total = float(sum(weights))
    return {k: sum((w / total) * s[k].to(torch.float64) for s, w in zip(states, weights)).float()
            for k in sorted(keys)}


def zo_aggregate(starts: Sequence[Mapping[str, torch.Tensor]], uploads: Sequence[tuple[Sequence[tuple[int, float]], float]],
                 weights: Sequence[float] | None = None) -> State:
    """A federation of only ZO devices: replay each device, then weighted-average the results.

    starts[k]: the parameters sent to device k; uploads[k] = (pairs, lr); weights default 1.
    """
    if len(starts) != len(uploads):
        raise ValueError(f"got {len(starts)} starting states for {len(uploads)} uploads")
    weights = [1.0] * len(starts) if weights is None else list(weights)
    finals = []
    for i, (start, (pairs, lr)) in enumerate(zip(starts, uploads)):
        try:
            finals.append(zo_replay_update(start, pairs, lr))
        except ValueError as e:
            raise ValueError(f"device {i}: {e}") from e
    return weighted_state_average(finals, weights)
