"""Personalized LoRA, FedDPA-style (Yang et al., 2024): every device trains a personal adapter of
rank max_rank next to the global one (both applied to its model, `edge_runtime.training.personal`),
keeps it on the device and uploads only the global adapter, which is averaged as in FedIT (one
common rank). The contract's `personal_rank` tells the device; the global model the coordinator
evaluates is the global adapter alone, a device's personalized model is global + its own."""
from __future__ import annotations

from protos.adapter import DeviceContract

from .base import Method


class FedDPA(Method):
    name = "feddpa"
    summary = "FedDPA: a personal adapter (kept on the device) next to the global one (averaged, FedIT)"

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        # a ZO device's update is replayed at the global's shape: it trains no personal adapter
        return DeviceContract(personal_rank=self.cfg.max_rank if mode != "zo" else 0)
