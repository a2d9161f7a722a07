"""`edge-runtime` command line. Each group of subcommands lives in its own module
(`cli_plan`: profile/plan/estimate, `cli_train`: train/generate/export, `cli_join`: join),
which exposes `register(subparsers)`; handlers return a process exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ("edge_runtime.cli_plan", "edge_runtime.cli_train", "edge_runtime.cli_join")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Edge device runtime for federated LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except MemoryError as e:  # the runtime's guard (training or model load) or a real allocation failure
        if getattr(args, "debug", False):
            raise
        print(f"edge-runtime {args.command}: out of memory: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"edge-runtime {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if getattr(args, "debug", False) or not _is_rpc_error(e):
            raise
        code = e.code()  # type: ignore[attr-defined]
        print(f"edge-runtime {args.command}: the coordinator answered {getattr(code, 'name', code)}: "
              f"{e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2


def _is_rpc_error(e: BaseException) -> bool:
    """A gRPC status from the coordinator (grpc.RpcError), told apart without importing grpc here."""
    return type(e).__module__.startswith("grpc") and callable(getattr(e, "details", None)) \
        and callable(getattr(e, "code", None))


if __name__ == "__main__":
    sys.exit(main())
