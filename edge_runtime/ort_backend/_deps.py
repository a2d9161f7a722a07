"""Import guards for onnxruntime-training: clear, actionable errors instead of deep ImportErrors.

Two failure modes are common on devices:
  * the package is missing -> "pip install .[ort]" (pins onnxruntime-training + onnx);
  * plain `onnxruntime` was installed after it and overwrote the shared `onnxruntime/` package,
    so `onnxruntime.training` is gone or its native symbols no longer match.
onnx must write IR <= 10 (onnx==1.17.0); newer onnx makes ORT 1.19 reject the artifacts.
"""
from __future__ import annotations

import importlib
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

ORT_TRAINING_PIN = "onnxruntime-training==1.19.2"
ONNX_PIN = "onnx==1.17.0"
MAX_IR_VERSION = 10
INSTALL_HINT = f"install it with `pip install .[ort]` (or `pip install {ORT_TRAINING_PIN} {ONNX_PIN}`)"


class OrtBackendError(RuntimeError):
    """The ORT training backend cannot run: missing/shadowed package or bad artifacts."""


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _shadow_message(detail: str) -> str:
    plain = _dist_version("onnxruntime")
    training = _dist_version("onnxruntime-training")
    return (f"onnxruntime-training is shadowed by plain onnxruntime {plain} (onnxruntime-training {training}): "
            "both install the same `onnxruntime/` package and the training API breaks. Fix: "
            f"`pip uninstall -y onnxruntime onnxruntime-training && pip install {ORT_TRAINING_PIN}`. "
            f"({detail})")


def _import_onnxruntime_without_torch() -> ModuleType:
    """`import onnxruntime` without letting it pull in torch.

    onnxruntime's import-time validation tries `onnxruntime.training.ortmodule` (which imports
    torch) and `onnxruntime.tools` imports torch whenever it is installed: ~0.3 GiB of RSS on a
    device that trains without torch. A `None` entry in sys.modules makes those imports fail
    fast (both paths tolerate ImportError); it is removed again right after.
    """
    if "torch" in sys.modules:  # loaded already (or blocked by the caller): nothing to avoid
        import onnxruntime
        return onnxruntime
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import onnxruntime
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return onnxruntime


def _import_training_api(onnxruntime: ModuleType) -> ModuleType:
    """Import `onnxruntime.training.api` without running `onnxruntime/training/__init__.py`.

    That __init__ imports `training.optim`, which needs torch; the on-device API (Module,
    Optimizer, CheckpointState) itself needs only the native extension and numpy. When torch
    is already loaded the package is imported normally.
    """
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    if sys.modules.get("torch") is not None or "onnxruntime.training" in sys.modules:
        return importlib.import_module("onnxruntime.training.api")
    pkg_dir = Path(onnxruntime.__file__).parent / "training"
    stub = ModuleType("onnxruntime.training")
    stub.__path__ = [str(pkg_dir)]
    stub.__package__ = "onnxruntime.training"
    stub.__file__ = str(pkg_dir / "__init__.py")
    sys.modules["onnxruntime.training"] = stub
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError:
        del sys.modules["onnxruntime.training"]
        raise


def require_ort_training() -> ModuleType:
    """Import and return `onnxruntime.training.api`, or raise OrtBackendError with the fix.

    Does not import torch (see `_import_training_api`); works on a device without torch.
    """
    try:
        onnxruntime = _import_onnxruntime_without_torch()
    except ImportError as e:
        raise OrtBackendError(f"onnxruntime-training is not installed ({e}); {INSTALL_HINT}") from None
    native = getattr(getattr(onnxruntime, "capi", None), "_pybind_state", None)
    has_training = (native is not None and hasattr(native, "PropagateCastOpsStrategy")
                    and (Path(onnxruntime.__file__).parent / "training" / "api").is_dir())
    if not has_training:
        if _dist_version("onnxruntime") is not None:
            raise OrtBackendError(_shadow_message(f"onnxruntime {getattr(onnxruntime, '__version__', '?')} "
                                                  f"at {Path(onnxruntime.__file__).parent} has no training API"))
        raise OrtBackendError(f"the installed onnxruntime has no training API; {INSTALL_HINT}")
    try:
        return _import_training_api(onnxruntime)
    except ImportError as e:
        if _dist_version("onnxruntime") is not None:
            raise OrtBackendError(_shadow_message(str(e))) from None
        raise OrtBackendError(f"onnxruntime.training.api failed to import ({e}); {INSTALL_HINT}") from None


def require_onnx() -> ModuleType:
    """Import and return `onnx`, checking it writes an IR version ORT 1.19 can load."""
    try:
        import onnx
    except ImportError as e:
        raise OrtBackendError(f"onnx is not installed ({e}); {INSTALL_HINT}") from None
    if onnx.IR_VERSION > MAX_IR_VERSION:
        raise OrtBackendError(f"onnx {onnx.__version__} writes IR version {onnx.IR_VERSION} but "
                              f"onnxruntime-training 1.19 reads at most IR {MAX_IR_VERSION}: "
                              f"`pip install {ONNX_PIN}`")
    return onnx


def require_artifacts_module() -> ModuleType:
    """Import `onnxruntime.training.artifacts` (export side: needs onnx, and torch is loaded)."""
    require_onnx()
    require_ort_training()
    return importlib.import_module("onnxruntime.training.artifacts")


def ort_available() -> bool:
    """True when the training API imports cleanly (no exception)."""
    try:
        require_ort_training()
        require_onnx()
    except OrtBackendError:
        return False
    return True
