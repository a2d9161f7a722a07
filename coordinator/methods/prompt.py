"""Prompt tuning, FedPrompt / PromptFL-style (Zhao et al. 2023; Guo et al. 2023): every device
trains the same `virtual_tokens` soft-prompt embeddings (virtual_tokens, hidden), prepended to its
inputs by peft's `PromptTuningConfig` (plus the classification head); the coordinator averages
them by examples, like FedAvg. Classification models only (`protos.peft_types`)."""
from __future__ import annotations

from .peft_avg import TensorAverage


class PromptTuning(TensorAverage):
    name = "prompt_tuning"
    summary = "FedPrompt: soft-prompt tuning (peft PromptTuningConfig, 16 virtual tokens), weighted average"
    peft = "prompt"
    virtual_tokens = 16
