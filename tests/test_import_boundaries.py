"""edge_runtime never imports coordinator and vice versa (checked statically on every module)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def _violations(package: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    return [str(f.relative_to(ROOT)) for f in files if forbidden in _imported_top_levels(f)]


def test_runtime_does_not_import_coordinator():
    assert _violations("edge_runtime", "coordinator") == []


def test_coordinator_does_not_import_runtime():
    assert _violations("coordinator", "edge_runtime") == []


def test_checker_detects_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from coordinator.aggregation import fedavg\nimport importlib\nimportlib.import_module('edge_runtime.x')\n")
    assert {"coordinator", "edge_runtime"} <= _imported_top_levels(bad)
