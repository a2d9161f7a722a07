"""(IA)^3 (Liu et al. 2022) federated with weighted averaging: every device trains peft's
`IA3Config` scaling vectors on peft's default targets for the model type (BERT: key, value and
the output dense layers; Llama: k_proj, v_proj, down_proj), plus the classification head; the
coordinator averages the vectors by examples. Its devices train at 6x the round's learning rate
(`lr_factor`; the scalings start at 1 and move slowly: a two-point sweep on SST-2 dev, seed 0, 3
rounds, fleet lr 5e-3: 76.3 % at 1x, 78.7 % at 6x, measured under the caveat in docs/methods.md).
Since 2026-12-02 the factor moves the scaling vectors only; the head trains at the round's rate."""
from __future__ import annotations

from .peft_avg import TensorAverage


class IA3(TensorAverage):
    name = "ia3"
    summary = "(IA)3: learned activation scalings (peft IA3Config), weighted average"
    peft = "ia3"
    lr_factor = 6.0
