"""Keep bitsandbytes out of training processes whose plan does not quantize with it.

peft imports bitsandbytes whenever it is installed (`peft.helpers`: ~44 MiB RSS and 2-5 s on
CPU, mostly torch custom-op registration), even for fp32 / bf16 / quanto plans. Python's own
mechanism hides it: `sys.modules["bitsandbytes"] = None` makes `import bitsandbytes` raise
ImportError and `importlib.util.find_spec` return None, which is what peft
(`peft.import_utils.is_bnb_available`) and transformers (`is_bitsandbytes_available`) check.

`use_bitsandbytes(needed)` is called by every entry point before it imports peft
(`model_loading.load_base`, `model_loading.apply_lora`, the ORT export). A later plan in the
same process that does need it (e.g. an out-of-memory step-down to int8 / nf4) calls it
again with `needed=True`: the module is un-hidden, imported, and the availability caches
that peft and transformers filled while it was hidden are cleared, so the bitsandbytes
route works as in a process that never hid it.
"""
from __future__ import annotations

import importlib
import logging
import sys
from importlib.machinery import PathFinder
from typing import Any

log = logging.getLogger(__name__)
BNB = "bitsandbytes"
BNB_PRECISIONS = ("int8", "nf4")
# lru_cached availability probes that may have answered False while bitsandbytes was hidden
_CACHED_PROBES = (("peft.import_utils", "is_bnb_available"), ("peft.import_utils", "is_bnb_4bit_available"),
                  ("transformers.utils.import_utils", "is_bitsandbytes_available"))
# modules that bind `bnb` at import time only if it was importable then
_BNB_BINDERS = ("peft.helpers", "transformers.integrations.bitsandbytes")


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes is installed, whether or not this process hides it."""
    return PathFinder.find_spec(BNB) is not None


def bitsandbytes_hidden() -> bool:
    """Whether this process currently hides bitsandbytes (see `use_bitsandbytes`)."""
    return BNB in sys.modules and sys.modules[BNB] is None


def needs_bitsandbytes(base_precision: str, quant_backend: str = "auto", gguf: bool = False) -> bool:
    """Whether `load_base` takes the bitsandbytes route for this precision (int8 / nf4, not via quanto)."""
    return base_precision in BNB_PRECISIONS and quant_backend in ("auto", "bnb") and not gguf


def quantized_with_bnb(model: Any) -> bool:
    """Whether transformers loaded `model` with a bitsandbytes quantization config."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "") == "bitsandbytes"


def use_bitsandbytes(needed: bool) -> bool:
    """Hide (`needed=False`) or make importable (`needed=True`) bitsandbytes for this process.

    Hiding is a no-op once bitsandbytes is imported (nothing left to save). Returns whether
    bitsandbytes is importable afterwards."""
    if not needed:
        if BNB not in sys.modules:
            sys.modules[BNB] = None  # type: ignore[assignment]
            log.debug("bitsandbytes hidden: this plan does not need it")
        return sys.modules[BNB] is not None
    was_hidden = bitsandbytes_hidden()
    if was_hidden:
        del sys.modules[BNB]
    try:
        bnb = importlib.import_module(BNB)
    except ImportError as e:
        log.debug("bitsandbytes not importable: %s", e)
        return False
    if was_hidden:
        _refresh_after_unhide(bnb)
        log.info("bitsandbytes enabled for an int8/nf4 plan in a process that had hidden it")
    return True


def _refresh_after_unhide(bnb: object) -> None:
    """Forget the 'bitsandbytes missing' answers peft / transformers gave while it was hidden."""
    for module, name in _CACHED_PROBES:
        probe = getattr(sys.modules.get(module), name, None)
        if hasattr(probe, "cache_clear"):
            probe.cache_clear()
    for module in _BNB_BINDERS:
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "bnb", None) is None:
            mod.bnb = bnb  # type: ignore[attr-defined]
