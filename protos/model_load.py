"""What both sides need around `from_pretrained`. Torch-only; no transformers import.

`LOAD_LOCK`: transformers 5 loads a model inside context managers that monkeypatch globals
(`PreTrainedModel.tie_weights` -> a no-op, torch's init functions, the default dtype) and restore
them on exit. Two loads in one process at once (a coordinator loading its base while in-process
devices load theirs, Flower's simulated clients in a thread pool, tests) interleave those patches,
and the last exit can restore the *patched* function: from then on no model in the process ties its
embeddings. Every load of ours holds this lock.

`ensure_output_head`: a checkpoint without an output head (GGUF files of tied-embedding models
carry no `output.weight`) means the head *is* the input embedding matrix. If the loaded model
was not tied (the race above, or a config that says otherwise), transformers leaves a randomly
initialised head and only logs a load report; the model then produces garbage (loss ~21 nats on
SmolLM2 instead of ~2.6). `ensure_output_head` ties it instead, or raises when it cannot."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from torch import nn

log = logging.getLogger(__name__)
LOAD_LOCK = threading.RLock()  # held around every from_pretrained of ours (see above)


class MissingOutputHeadError(ValueError):
    """The checkpoint has no output head and the input embeddings cannot stand in for it."""


def _names_of(model: nn.Module, param: nn.Parameter) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is param}


def ensure_output_head(model: nn.Module, missing_keys: Iterable[str]) -> bool:
    """Tie a causal LM's output head to its input embeddings when the checkpoint lacked the head
    (`missing_keys` from `from_pretrained(..., output_loading_info=True)`) or the config asks
    for tying and the two are separate tensors. Returns True when it tied.

    Raises MissingOutputHeadError when the head is missing and the embedding matrix has another
    shape ([vocab, hidden] both) — that model cannot be used without its head."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if get_out else None
    emb = get_in() if get_in else None
    if out is None or emb is None or not hasattr(out, "weight") or not hasattr(emb, "weight"):
        return False
    if out.weight is emb.weight:
        return False
    missing = bool(_names_of(model, out.weight) & set(missing_keys))
    wants_tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if not (missing or wants_tie):
        return False
    if tuple(out.weight.shape) != tuple(emb.weight.shape):
        if missing:
            raise MissingOutputHeadError(
                f"the checkpoint has no output head ({sorted(_names_of(model, out.weight))}) and the input "
                f"embeddings {tuple(emb.weight.shape)} cannot replace it (head {tuple(out.weight.shape)}); "
                "use a checkpoint that includes the output head")
        return False
    out.weight = emb.weight
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = True
    log.warning("output head %s: %s; tied it to the input embeddings", sorted(_names_of(model, out.weight)),
                "missing from the checkpoint" if missing else "config asks for tied embeddings")
    return True
