"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) federated with weighted averaging,
as FedAdapter (Cai et al. 2023) at a fixed depth and width: every device trains a `bottleneck`-wide
adapter after each transformer layer's feed-forward block, h -> h + W_up gelu(W_down h) (W_down
(16, hidden), W_up (hidden, 16) zero-initialised, with biases: `protos.bottleneck`), plus the
classification head; the coordinator averages the tensors by examples.

lr_factor stays 1.0: a three-point measurement on SST-2 dev (tools/bench_federated.py, seed 0, 3
rounds, the default fleet, lr 5e-3) gave at 1x 67.8, 68.3, 63.6 % (dev loss 0.676, 0.648, 0.633:
falling every round), at 3x 63.3, 77.2, 58.4 % (0.664, 0.598, 0.691: up again in round 3), at 6x
49.1, 51.5, 65.5 % (0.750, 0.693, 0.645); round 0 54.9 % (0.692). 1x has the lowest round-3 loss and
no setback; it reached 76.8 % by round 5 (docs/methods.md)."""
from __future__ import annotations

from protos.peft_names import DEFAULT_BOTTLENECK

from .peft_avg import TensorAverage


class Adapter(TensorAverage):
    name = "adapter"
    summary = f"Bottleneck adapters after each FFN (width {DEFAULT_BOTTLENECK}; FedAdapter), weighted average"
    peft = "adapter"
    bottleneck = DEFAULT_BOTTLENECK
