"""Zeroth-order for everyone (FedKSeed-style): every device trains with seeded SPSA steps and
uploads (seed, scalar) pairs; the coordinator replays them bit-exactly into adapters and
averages them like FedAvg. Secure aggregation sums the per-seed scalars (a shared seed pool).
"""
from __future__ import annotations

from .base import Method


class ZerothOrder(Method):
    name = "zo"
    summary = "every device zeroth-order: seeds + scalars replayed, averaged at one rank"
    all_zo = True

    def device_mode(self, plan_mode: str) -> str:
        return "zo"
