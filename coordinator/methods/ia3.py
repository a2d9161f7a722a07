"""(IA)^3 (Liu et al. 2022) federated with weighted averaging: every device trains peft's
`IA3Config` scaling vectors on peft's default targets for the model type (BERT: key, value and
the output dense layers; Llama: k_proj, v_proj, down_proj), plus the classification head; the
coordinator averages the vectors by examples."""
from __future__ import annotations

from .peft_avg import TensorAverage


class IA3(TensorAverage):
    name = "ia3"
    summary = "(IA)3: learned activation scalings (peft IA3Config), weighted average"
    peft = "ia3"
