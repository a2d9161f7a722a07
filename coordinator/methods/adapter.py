"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) federated with weighted averaging,
as FedAdapter (Cai et al. 2023) at a fixed depth and width: every device trains a `bottleneck`-wide
adapter after each transformer layer's feed-forward block, h -> h + W_up gelu(W_down h) (W_down
(16, hidden), W_up (hidden, 16) zero-initialised, with biases: `protos.bottleneck`), plus the
classification head; the coordinator averages the tensors by examples.

lr_factor: see LR_NOTE."""
from __future__ import annotations

from protos.peft_names import DEFAULT_BOTTLENECK

from .peft_avg import TensorAverage


class Adapter(TensorAverage):
    name = "adapter"
    summary = f"Bottleneck adapters after each FFN (width {DEFAULT_BOTTLENECK}; FedAdapter), weighted average"
    peft = "adapter"
    bottleneck = DEFAULT_BOTTLENECK
