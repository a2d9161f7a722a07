"""Losses: classification cross-entropy and chunked causal-LM cross-entropy.

Causal LM (memory model for the estimator): the decoder body runs once to hidden states
(B, T, H); only positions whose next token is a target (the response) go through `lm_head`,
in chunks of `chunk_tokens` rows. Each chunk's logits (chunk_tokens, V) are recomputed in
backward (activation checkpointing), so logits memory is bounded by about
`3 * chunk_tokens * V * 4` bytes (fp32 logits, softmax, grad) instead of `B * T * V * 4 * 3`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from edge_runtime.training.batching import IGNORE

CHUNK_TOKENS = 256


def classification_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, num_labels) float32 logits."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(classification_logits(model, batch), batch["labels"])


def causal_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, lm_head) of a (peft-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return body, lm.get_output_embeddings()


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module]:
    """(B, T, H) last hidden states and the lm_head."""
    body, head = causal_parts(model)
    out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.last_hidden_state, head


def _chunk_ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor, first: torch.Tensor | None = None,
                  ids: torch.Tensor | None = None, vals: torch.Tensor | None = None) -> torch.Tensor:
    z = head(h).float()                         # (n, V)
    total = F.cross_entropy(z, y, reduction="sum")
    if first is not None and bool(first.any()):
        total = total + bias_adjustment(z[first], y[first], ids, vals)
    return total


def bias_adjustment(z: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """sum over rows of (logit-adjusted loss - CE(z, y)) for target tokens among the label words `ids` (K,).

    -log p(y) = -log P(label words) - log p(y | label words): the second term becomes the cross-entropy of
    the words' logits + `vals` (K,), a K-way softmax as a classifier's logit adjustment; z (m, V), y (m,).
    """
    zc = z[:, ids]                                                     # (m, K)
    hit = (y[:, None] == ids[None, :]).to(z.dtype)                     # (m, K) one-hot, or 0 if y is no word
    adj = torch.logsumexp(zc + vals, -1) - torch.logsumexp(zc, -1) - (hit * vals).sum(-1)  # (m,)
    return (adj * hit.sum(-1)).sum()


def chunked_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS,
               first: torch.Tensor | None = None, bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross-entropy of head(h) (N, V) vs targets y (N,), `chunk_tokens` rows at a time; rows where
    `first` (N,) holds get `bias` (ids, values) on their logits."""
    ids, vals = bias if bias is not None else (None, None)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[s:s + chunk_tokens], y[s:s + chunk_tokens]
        fc = None if first is None else first[s:s + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, head, hc, yc, fc, ids, vals, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(head, hc, yc, fc, ids, vals)
    return total / max(1, h.shape[0])


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = CHUNK_TOKENS,
                   first_bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens only (labels != -100).

    first_bias: (token ids (K,), values (K,)) added to those tokens' logits at each example's first
    response position (logit adjustment of label words; `edge_runtime.training.label_prior`).
    """
    hs, head = hidden_states(model, batch)
    first = None
    if first_bias is not None:
        first = torch.zeros(batch["labels"].shape[0], batch["labels"].shape[1] - 1, dtype=torch.bool,
                            device=hs.device)  # (B, T-1): the position that predicts the first response token
        first[torch.arange(first.shape[0], device=hs.device), batch["prompt_len"].to(hs.device) - 1] = True
    return _masked_ce(hs, head, batch["labels"], chunk_tokens, first, first_bias)


def _masked_ce(hs: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int,
               first: torch.Tensor | None = None, bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    target = labels[:, 1:]                      # (B, T-1)
    keep = target != IGNORE
    if not bool(keep.any()):
        raise ValueError("batch has no response tokens to learn from (all labels are -100); "
                         "increase seq_len or shorten prompts")
    h = hs[:, :-1][keep]                        # (N, H)
    return chunked_ce(head, h, target[keep], chunk_tokens, None if first is None else first[keep], bias)


def causal_eval(model: nn.Module, batch: dict[str, torch.Tensor], candidates: dict[int, int] | None,
                chunk_tokens: int = CHUNK_TOKENS) -> tuple[float, int, Any]:
    """(summed response loss over examples, number of examples, predicted labels or None).

    With `candidates` {label: first response token id}, the prediction is the label whose
    token has the largest next-token logit right after the prompt.
    """
    hs, head = hidden_states(model, batch)
    B = hs.shape[0]
    loss_sum = 0.0
    for i in range(B):
        loss_sum += float(_masked_ce(hs[i:i + 1], head, batch["labels"][i:i + 1], chunk_tokens))
    preds = None
    if candidates:
        pos = batch["prompt_len"] - 1                            # (B,)
        h_last = hs[torch.arange(B, device=hs.device), pos]      # (B, H)
        labels_sorted = sorted(candidates)
        tok_ids = torch.tensor([candidates[c] for c in labels_sorted], device=hs.device)
        cand_logits = head(h_last).float()[:, tok_ids]           # (B, C)
        preds = torch.tensor(labels_sorted)[cand_logits.argmax(-1).cpu()]
    return loss_sum, B, preds


def proximal_term(params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * sum_k ||params[k] - ref[k]||^2 over the trainable tensors (a scalar)."""
    total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    for k, p in params.items():
        total = total + (p.float() - ref[k].float()).pow(2).sum()
    return 0.5 * float(mu) * total
