"""Prompt tuning, FedPrompt / PromptFL-style (Zhao et al. 2023; Guo et al. 2023): every device
trains the same `virtual_tokens` soft-prompt embeddings (virtual_tokens, hidden), prepended to its
inputs by peft's `PromptTuningConfig` (plus the classification head); the coordinator averages
them by examples, like FedAvg. Classification models only (`protos.peft_types`).

Devices train at 6x the round's learning rate (`lr_factor`, as (IA)3): the prompts and the head over a
checkpoint's unit-norm sentence vector (protos.pooling) barely move at the LoRA rate (SST-2 train/dev,
seed 1, 5 rounds: 50.9 -> 51.3 % at 1x, 50.9 -> 71.3 % rising every round at 6x; docs/methods.md).
Since 2026-12-02 the factor moves the prompts only; the head trains at the round's rate over the
scaled sentence vector (`TrainingRecipe.head_lr_scale`, `protos.pooling.NORMALIZED_SCALE`)."""
from __future__ import annotations

from .peft_avg import TensorAverage


class PromptTuning(TensorAverage):
    name = "prompt_tuning"
    summary = "FedPrompt: soft-prompt tuning (peft PromptTuningConfig, 16 virtual tokens), weighted average"
    peft = "prompt"
    virtual_tokens = 16
    lr_factor = 6.0
