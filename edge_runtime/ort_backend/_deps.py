"""Import guards for onnxruntime-training: clear, actionable errors instead of deep ImportErrors.

Two failure modes are common on devices:
  * the package is missing -> "pip install .[ort]" (pins onnxruntime-training + onnx);
  * plain `onnxruntime` was installed after it and overwrote the shared `onnxruntime/` package,
    so `onnxruntime.training` is gone or its native symbols no longer match.
onnx must write IR <= 10 (onnx==1.17.0); newer onnx makes ORT 1.19 reject the artifacts.
"""
from __future__ import annotations

from importlib import metadata
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


def require_ort_training() -> ModuleType:
    """Import and return `onnxruntime.training.api`, or raise OrtBackendError with the fix."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise OrtBackendError(f"onnxruntime-training is not installed ({e}); {INSTALL_HINT}") from None
    try:
        from onnxruntime.training import api
    except ImportError as e:
        if _dist_version("onnxruntime") is not None:
            raise OrtBackendError(_shadow_message(str(e))) from None
        raise OrtBackendError(f"onnxruntime is installed without its training API ({e}); "
                              f"the plain package cannot train: {INSTALL_HINT}") from None
    return api


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
    """Import `onnxruntime.training.artifacts` (needs onnx too) with the same clear errors."""
    require_onnx()
    require_ort_training()
    from onnxruntime.training import artifacts
    return artifacts


def ort_available() -> bool:
    """True when the training API imports cleanly (no exception)."""
    try:
        require_ort_training()
        require_onnx()
    except OrtBackendError:
        return False
    return True
