"""A sentence-embedding checkpoint's own pooling for sequence classification (both sides).

A sentence-transformers checkpoint (e.g. all-MiniLM-L6-v2) declares how its sentence vector is made:
`modules.json` lists a Pooling module (`1_Pooling/config.json`: mean / cls / max over tokens) and
often a Normalize module (L2). transformers' `*ForSequenceClassification` ignores that and feeds
its classifier the BERT pooler instead (tanh(W h_CLS + b) over the first token), a layer the
sentence-embedding training never used. `use_checkpoint_pooling` makes the classifier read the
vector the checkpoint was trained to produce:

- `SentencePooler` replaces `model.<encoder>.pooler`: (B, T, H) hidden states and the (B, T')
  attention mask -> (B, H) masked mean (or the first token), L2-normalised when the checkpoint
  says so. T' >= T (prompt tuning prepends virtual tokens; the mask's last T columns are used).
- A normalised vector is multiplied by `NORMALIZED_SCALE` (a cosine classifier's scale, as in
  NormFace / CosFace): the head is initialised like BERT's (std 0.02) for inputs of unit-size
  coordinates; over a unit vector its logits start near 0 (margin sd 0.03) and grow only as fast as
  the head's norm, so a federated round's averaged head stayed timid (margin sd 0.08 after round 1 on
  SST-2) and a small bias shift flipped the class of most rows. Measured in docs/federated.md.
- The mask reaches it through a forward pre-hook on the encoder (the encoder calls its pooler with
  the hidden states only).

Both the devices (edge_runtime.training.model_loading) and the coordinator (coordinator.model)
call it right after loading, so they compute the same function; a checkpoint without
`modules.json` keeps transformers' pooler. Measured on SST-2 in docs/federated.md."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
POOLING_MODES = ("mean", "cls")
_POOL_TYPE = "sentence_transformers.models.Pooling"
_NORM_TYPE = "sentence_transformers.models.Normalize"
NORMALIZED_SCALE = 8.0  # x the L2-normalised sentence vector the head reads (chosen on SST-2 train/dev)


def checkpoint_pooling(directory: str | Path) -> tuple[str, bool] | None:
    """(mode, normalize) that `directory`'s modules.json declares, or None (no sentence-transformers
    pipeline, or a pooling this module does not implement: transformers' pooler stays)."""
    d = Path(directory)
    modules = d / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        types = {e.get("type"): e.get("path", "") for e in entries}
        if _POOL_TYPE not in types:
            return None
        cfg = json.loads((d / types[_POOL_TYPE] / "config.json").read_text())
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("%s: cannot read the sentence-transformers pooling (%s); keeping the model's pooler", d, e)
        return None
    mode = "mean" if cfg.get("pooling_mode_mean_tokens") else "cls" if cfg.get("pooling_mode_cls_token") else None
    if mode is None:
        log.warning("%s: pooling %s is not implemented here (mean / cls are); keeping the model's pooler", d, cfg)
        return None
    return mode, _NORM_TYPE in types


class SentencePooler(nn.Module):
    """(B, T, H) hidden states -> (B, H) sentence vector: masked mean or first token, optionally
    L2-normalised and then multiplied by `scale` (norm = scale)."""

    def __init__(self, mode: str, normalize: bool, scale: float = 1.0):
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {mode!r}: expected one of {POOLING_MODES}")
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"pooling scale {scale!r}: expected a finite number > 0")
        self.mode, self.normalize, self.scale = mode, bool(normalize), float(scale)
        self.mask: torch.Tensor | None = None  # (B, T') set by the encoder's pre-hook for each forward

    def remember_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the encoder: keep the call's attention mask (keyword or 2nd positional)."""
        mask = kwargs.get("attention_mask")
        self.mask = mask if mask is not None or len(args) < 2 else args[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            v = hidden[:, 0]
        else:
            m = self.mask
            if m is None or m.shape[0] != hidden.shape[0]:
                m = torch.ones(hidden.shape[:2], device=hidden.device)
            w = m[:, -hidden.shape[1]:].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            v = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
        return F.normalize(v, dim=-1) * self.scale if self.normalize else v


def use_checkpoint_pooling(model: nn.Module, directory: str | Path) -> str | None:
    """In place: a sequence classifier whose checkpoint declares its pooling reads that vector instead
    of its BERT pooler. Returns a description ('mean+normalize') or None when nothing changed."""
    found = checkpoint_pooling(directory)
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if found is None or encoder is None or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        return None
    description = found[0] + (f"+normalize*{NORMALIZED_SCALE:g}" if found[1] else "")
    if isinstance(encoder.pooler, SentencePooler):  # a second call: its pre-hook is already there
        return description
    pooler = SentencePooler(*found, scale=NORMALIZED_SCALE if found[1] else 1.0)
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)
    return description
