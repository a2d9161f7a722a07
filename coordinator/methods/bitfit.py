"""BitFit (Ben Zaken et al. 2022) federated with weighted averaging: every device trains only the
base model's bias terms (plus the classification head, as with LoRA; `protos.peft_types.BitFit`,
peft has no config for it); the coordinator averages the biases by examples. Models without
biases (Llama-style) are refused with a clear error on the device."""
from __future__ import annotations

from .peft_avg import TensorAverage


class BitFit(TensorAverage):
    name = "bitfit"
    summary = "BitFit: bias-only tuning (+ the head), weighted average"
    peft = "bitfit"
