"""The committed generated stubs match federation.proto (regenerated into a temp dir, compared bytewise)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_stubs_are_fresh():
    pytest.importorskip("grpc_tools")
    stale = _gen().stale_files()
    assert stale == [], f"stale generated files {stale}: run `python tools/gen_protos.py`"


def test_staleness_is_detected(tmp_path, monkeypatch):
    pytest.importorskip("grpc_tools")
    gen = _gen()
    fake = tmp_path / "protos"
    fake.mkdir()
    (fake / "federation.proto").write_text((ROOT / "protos" / "federation.proto").read_text()
                                           + "\nmessage Extra { string x = 1; }\n")
    for name in gen.OUTPUTS:
        (fake / name).write_bytes((ROOT / "protos" / name).read_bytes())
    monkeypatch.setattr(gen, "PROTO_DIR", fake)
    assert set(gen.stale_files()) >= {"federation_pb2.py", "federation_pb2.pyi"}


def test_grpc_module_uses_package_relative_import():
    src = (ROOT / "protos" / "federation_pb2_grpc.py").read_text()
    assert "from . import federation_pb2 as federation__pb2" in src
    assert "\nimport federation_pb2" not in src


def test_gencode_not_newer_than_runtime():
    from google.protobuf import __version__ as runtime

    src = (ROOT / "protos" / "federation_pb2.py").read_text()
    line = next(ln for ln in src.splitlines() if "Protobuf Python Version" in ln)
    gencode = tuple(int(x) for x in line.split(":")[1].strip().split(".")[:3])
    assert gencode <= tuple(int(x) for x in runtime.split(".")[:3]), (gencode, runtime)
    from protos import federation_pb2  # noqa: F401 - import validates the runtime version
    assert "protos.federation_pb2" in sys.modules
