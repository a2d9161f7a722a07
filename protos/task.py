"""The task contract both sides share: a causal LM's label words (label k -> words[k]), validated once.

The coordinator sends them (gRPC `TrainingConfig.label_words`, Flower's `label_words` fit config as a
JSON list) so that every device casts labelled rows to the same responses and adjusts the same words'
logits (edge_runtime.training.label_prior)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def check_label_words(words: Sequence[Any], where: str = "label_words") -> tuple[str, ...]:
    """`words` as a tuple; ValueError naming `where` unless they are distinct non-empty strings (none or >= 2)."""
    out = tuple(words or ())
    if any(not isinstance(w, str) or not w.strip() for w in out) or len(set(out)) < len(out) or len(out) == 1:
        raise ValueError(f"{where} {list(out)!r}: expected distinct non-empty words, one per class "
                         f"(at least 2), e.g. negative,positive")
    return out


def label_words_from_json(text: str, where: str = "label_words") -> tuple[str, ...]:
    """The words of a JSON list ('' -> none)."""
    if not text:
        return ()
    try:
        words = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} {text!r}: not a JSON list of words ({e})") from e
    if not isinstance(words, list):
        raise ValueError(f"{where} {text!r}: expected a JSON list of words")
    return check_label_words(words, where)
