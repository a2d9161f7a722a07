"""Label priors for local logit adjustment (FedLC-style): a classifier's logits, and a causal LM's
label-word tokens at the first response position (classification data cast as instructions).

A device trains on logits + tau * log(prior of its own labels), so a shard holding one class has
little left to push towards it and does not drag the shared model to its majority label.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from edge_runtime.training import batching

log = logging.getLogger(__name__)


def log_prior(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """(K,) add-one log prior of `labels`: a label the shard lacks is rare, not impossible."""
    counts = torch.ones(num_labels)
    for y in labels:
        counts[int(y)] += 1
    return (counts / counts.sum()).log()


def label_candidates(examples: Sequence[batching.Example]) -> dict[int, int] | None:
    """{label: first response token id} when every (causal LM) example carries a label, else None."""
    if not examples or examples[0].labels is None or any(e.label is None for e in examples):
        return None
    cands: dict[int, int] = {}
    for e in examples:
        cands.setdefault(int(e.label), e.input_ids[e.prompt_len])
    return cands if len(cands) > 1 else None


def label_word_tokens(tokenizer: Any, words: Sequence[str], seq_len: int) -> list[int]:
    """The first response token of each label word, exactly as `batching.encode_instructions` makes it."""
    recs = [{"instruction": "x", "input": "", "output": w} for w in words]
    return [e.input_ids[e.prompt_len] for e in batching.encode_instructions(tokenizer, recs, seq_len)]


def response_prior(examples: Sequence[batching.Example], tokenizer: Any, words: Sequence[str],
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(token ids (K,), log prior (K,)) of a causal LM's label words over labelled examples; None when the
    examples carry no labels, or `words` do not start their responses (logit adjustment is then off)."""
    if not examples or any(e.label is None or e.labels is None for e in examples):
        return None
    ids = label_word_tokens(tokenizer, words, seq_len)
    if len(set(ids)) < len(ids):
        log.warning("label words %s share a first token: no logit adjustment on the response", list(words))
        return None
    bad = next((e for e in examples if not 0 <= int(e.label) < len(ids) or e.input_ids[e.prompt_len] != ids[e.label]),
               None)
    if bad is not None:
        log.warning("a response does not start with its label word (label %s, words %s): no logit adjustment; "
                    "give the task its label_words", bad.label, list(words))
        return None
    return torch.tensor(ids), log_prior([int(e.label) for e in examples], len(ids))
