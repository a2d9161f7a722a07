"""What the non-LoRA PEFT methods share (prompt tuning, (IA)3, BitFit, bottleneck adapters): the
global is a dict of named trainable tensors, weighted-averaged by name.

The engine already averages every non-LoRA tensor of an upload (`GlobalState.extra`, the head's
path); these methods keep all of their state there and no LoRA modules: `initial` takes the
state `coordinator.model.initial_adapter_state(..., peft=cls.peft)` builds, `serve` sends no
factors (the download is the extras), the contract names the PEFT type so every device builds
the same adapter (`protos.peft_types`), and the one validator checks every upload's names and
shapes against what was sent. Nothing is merged into the base weights (`deltas` is empty; the
evaluator applies the tensors through the same peft wrapper).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from protos.adapter import DeviceContract, module_of

from ..aggregation import GlobalState
from .base import Method, Served


class TensorAverage(Method):
    """Weighted average of named tensors; subclasses set `peft` (and `virtual_tokens` / `bottleneck`)."""

    common_rank: ClassVar[bool] = False  # a device's LoRA rank means nothing here: every device, whatever its
    # plan's rank, trains the same tensors (so no device is refused for its rank)
    serves_base: ClassVar[bool] = False
    # secure aggregation: the aggregate is the weighted mean of named tensors, linear in what devices send:
    # each device masks w_k (its tensors - what it downloaded) over the download's keys, and
    # `coordinator.secagg_round.global_from_sum` adds the unmasked mean change to the global's extras

    def initial(self, init_state: Mapping[str, torch.Tensor]) -> GlobalState:
        """The round-1 global: every tensor of `init_state` (keys from `protos.peft_types.trainable`)."""
        lora = [k for k in init_state if module_of(k) is not None]
        if lora or not init_state:
            raise ValueError(f"strategy {self.name!r} trains peft {self.peft!r}: its initial state must come from "
                             f"initial_adapter_state(..., peft={self.peft!r}), got "
                             f"{'LoRA keys ' + str(lora[:2]) if lora else 'no tensors'}")
        return GlobalState(self.name, {}, {k: v.detach().float().clone() for k, v in sorted(init_state.items())})

    def serve(self, g: GlobalState, rank: int, seed: int) -> Served:
        return Served({}, {})

    def contract(self, mode: str, round_id: int = 0) -> DeviceContract:
        return DeviceContract(peft=self.peft, virtual_tokens=self.virtual_tokens, bottleneck=self.bottleneck)

    def deltas(self, g: GlobalState) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {}
