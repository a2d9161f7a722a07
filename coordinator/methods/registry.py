"""Method name -> class. Adding a method: its module, plus one line here."""
from __future__ import annotations

from .adapter import Adapter
from .base import Method, MethodConfig
from .bitfit import BitFit
from .fedavg import FedAvg
from .fedex import FedExLoRA
from .feddpa import FedDPA
from .fedsa import FedSA
from .ffa import FFALoRA
from .hetlora import HetLoRA
from .ia3 import IA3
from .prompt import PromptTuning
from .rolora import RoLoRA
from .stack import Stack
from .svd import SvdRedistribute
from .zero_pad import ZeroPad
from .zo import ZerothOrder

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    FedAvg,
    ZeroPad,
    Stack,
    SvdRedistribute,
    FedSA,
    ZerothOrder,
    FFALoRA,
    RoLoRA,
    FedExLoRA,
    HetLoRA,
    FedDPA,
    PromptTuning,
    IA3,
    BitFit,
    Adapter,
)}
NAMES = tuple(METHODS)
DEFAULT = "zero_pad"  # what `edge-coordinator serve`, the Flower app and the library use unless told


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}") from None


def make_method(cfg: MethodConfig) -> Method:
    """The method object for a config (raises ValueError naming the choices for an unknown name)."""
    return method_class(cfg.name)(cfg)
