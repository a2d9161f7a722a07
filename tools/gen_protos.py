"""Regenerate protos/federation_pb2.py, _pb2_grpc.py and .pyi from protos/federation.proto.

Usage: python tools/gen_protos.py [--check]
--check regenerates into a temporary directory and exits 1 when the committed files differ
(run without --check to refresh them). Needs grpcio-tools==1.81.1 (protobuf gencode 6.33.x,
not newer than the runtime protobuf 6.33.6).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
PROTO = "federation.proto"
OUTPUTS = ("federation_pb2.py", "federation_pb2_grpc.py", "federation_pb2.pyi")
GRPC_TOOLS_VERSION = "1.81.1"


def generate(out_dir: Path) -> dict[str, bytes]:
    """Run protoc into `out_dir`; return {file name: bytes} with the grpc import made package-relative."""
    from importlib.metadata import version

    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is not installed: pip install grpcio-tools==" + GRPC_TOOLS_VERSION)
    have = version("grpcio-tools")
    if have != GRPC_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools {have} found; the committed stubs use {GRPC_TOOLS_VERSION} "
                         f"(pip install grpcio-tools=={GRPC_TOOLS_VERSION})")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    # relative paths keep absolute machine paths out of the generated files
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", str(PROTO_DIR / PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    files = {name: (out_dir / name).read_bytes() for name in OUTPUTS}
    grpc_src = files["federation_pb2_grpc.py"].decode()
    grpc_src, n = re.subn(r"^import federation_pb2 as federation__pb2$",
                          "from . import federation_pb2 as federation__pb2", grpc_src, flags=re.M)
    if n != 1:
        raise SystemExit("could not find the federation_pb2 import in the generated grpc module")
    files["federation_pb2_grpc.py"] = grpc_src.encode()
    return files


def stale_files() -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    return [n for n, data in fresh.items()
            if not (PROTO_DIR / n).exists() or (PROTO_DIR / n).read_bytes() != data]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files: {stale}; run `python tools/gen_protos.py`", file=sys.stderr)
            return 1
        print("generated protos are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in generate(Path(tmp)).items():
            (PROTO_DIR / name).write_bytes(data)
            print(f"wrote protos/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
