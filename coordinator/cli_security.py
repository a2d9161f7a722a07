"""Security / reliability parts of the `edge-coordinator` command line.

- `serve` flags: TLS (`--tls-cert/--tls-key`, `--client-ca` for mTLS) or `--insecure`
  (plaintext, with a warning); enrolment (`--open-enrolment`, default: on only with
  --insecure); upload checks (`--max-upload-bytes`); defences (`--robust`, `--clip-norm`,
  `--trim`, `--dp-noise`, `--dp-delta`).
- `enrol --store DIR [--count N] [--revoke ID] [--list]`: issue / revoke enrolment tokens.
- `certs --out DIR [--host H ...] [--client NAME ...]`: a development CA + certificates.
- `status` extras: refusals per reason, DP epsilon, enrolment tokens.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from protos import wire

from .defences import ROBUST

log = logging.getLogger("coordinator.cli")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags of `serve` beyond the TLS ones cli.py already declares."""
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC without TLS (loopback / trusted networks only); also opens enrolment "
                        "unless --no-open-enrolment")
    p.add_argument("--open-enrolment", action=argparse.BooleanOptionalAction, default=None,
                   help="let devices register without an enrolment token (default: only with --insecure)")
    p.add_argument("--max-upload-bytes", type=int, default=wire.MAX_BLOB_BYTES, help="size cap of one upload")
    p.add_argument("--robust", choices=ROBUST, default="none",
                   help="robust combination of the devices' updates (coordinate-wise, over effective updates)")
    p.add_argument("--clip-norm", type=float, default=0.0, help="clip each device's update to this L2 norm (0: off)")
    p.add_argument("--trim", type=float, default=0.2, help="--robust trimmed_mean: fraction dropped at each end")
    p.add_argument("--dp-noise", type=float, default=0.0,
                   help="client-level DP noise multiplier sigma (needs --clip-norm; 0: off)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported (epsilon, delta)-DP")


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """CoordinatorConfig keyword arguments from the flags above; warns about plaintext."""
    has_tls = bool(args.tls_cert or args.tls_key)
    if has_tls and args.insecure:
        raise ValueError("--insecure contradicts --tls-cert/--tls-key; choose one")
    if not has_tls and not args.insecure:
        raise ValueError("serve needs TLS (--tls-cert and --tls-key; development ones: `edge-coordinator certs "
                         "--out DIR`) or --insecure for plaintext on loopback / a trusted network")
    if args.client_ca and not has_tls:
        raise ValueError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    open_enrolment = args.insecure if args.open_enrolment is None else args.open_enrolment
    if args.insecure:
        log.warning("serving PLAINTEXT gRPC (--insecure): device tokens and updates travel unencrypted; "
                    "use --tls-cert/--tls-key outside loopback or a trusted network")
    if open_enrolment:
        log.warning("open enrolment: any device may register without an enrolment token")
    if args.max_upload_bytes < 1:
        raise ValueError(f"--max-upload-bytes {args.max_upload_bytes}: expected a positive byte count")
    return {"open_enrolment": open_enrolment, "max_upload_bytes": args.max_upload_bytes, "robust": args.robust,
            "clip_norm": args.clip_norm, "trim": args.trim, "dp_noise": args.dp_noise, "dp_delta": args.dp_delta}


def server_credentials(args: argparse.Namespace):
    from .security import server_credentials as creds

    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return creds(args.tls_cert, args.tls_key, args.client_ca)


# -- enrol / certs -------------------------------------------------------------------------------
def add_admin_commands(sub) -> None:
    e = sub.add_parser("enrol", help="issue or revoke device enrolment tokens (stored hashed in the store)")
    e.add_argument("--store", required=True)
    e.add_argument("--count", type=int, default=None, help="issue this many tokens (default 1 unless --revoke/--list)")
    e.add_argument("--revoke", action="append", default=[], metavar="ID",
                   help="revoke an enrolment token id (et_xxxxxxxx) or a device id (repeatable)")
    e.add_argument("--list", action="store_true", help="list tokens (ids, bound devices, revocations)")
    e.add_argument("--note", default="", help="free text stored with the issued tokens")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_enrol)
    c = sub.add_parser("certs", help="generate a development CA, server and client certificates (TLS / mTLS)")
    c.add_argument("--out", required=True)
    c.add_argument("--host", action="append", default=[], help="server host name or IP (repeatable; default "
                                                                  "localhost, 127.0.0.1, ::1)")
    c.add_argument("--client", action="append", default=[], help="client certificate name (repeatable; default device)")
    c.add_argument("--days", type=int, default=365)
    c.set_defaults(func=cmd_certs)


def cmd_enrol(args: argparse.Namespace) -> int:
    from .enrolment import EnrolmentRegistry

    reg = EnrolmentRegistry(args.store)
    try:
        out: dict[str, Any] = {}
        if args.revoke:
            out["revoked_devices"] = sorted({d for subject in args.revoke for d in reg.revoke(subject)})
            out["revoked"] = list(args.revoke)
        count = args.count if args.count is not None else (0 if args.revoke or args.list else 1)
        if count:
            out["tokens"] = reg.issue(count, args.note)
        if args.list:
            out["list"] = reg.tokens()
    finally:
        reg.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for t in out.get("tokens", []):
        print(t)
    if out.get("tokens"):
        print(f"# {len(out['tokens'])} enrolment token(s); shown once, stored hashed in {args.store}. "
              "Devices pass one with `edge-runtime join ... --enrolment-token TOKEN`.")
    if args.revoke:
        print(f"revoked {', '.join(args.revoke)}; devices refused from now on: "
              f"{', '.join(out['revoked_devices']) or '(none enrolled yet)'}")
    for row in out.get("list", []):
        state = "revoked" if row["revoked_at"] else ("bound to " + row["device_id"] if row["device_id"] else "unused")
        print(f"et_{row['token_id']}  {state}  {row['note'] or ''}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from .security import DEFAULT_HOSTS, generate_dev_pki

    pki = generate_dev_pki(args.out, args.host or DEFAULT_HOSTS, args.client or ["device"], args.days)
    print(f"CA          {pki.ca_cert}  (key {pki.ca_key}: keep it private)")
    print(f"server      {pki.server_cert} / {pki.server_key}")
    for name, (cert, key) in pki.clients.items():
        print(f"client {name}: {cert} / {key}")
    print(f"serve:  edge-coordinator serve ... --tls-cert {pki.server_cert} --tls-key {pki.server_key} "
          f"--client-ca {pki.ca_cert}")
    name, (cert, key) = next(iter(pki.clients.items()))
    print(f"join:   edge-runtime join HOST:PORT ... --root-ca {pki.ca_cert} --client-cert {cert} --client-key {key}")
    return 0


# -- status ------------------------------------------------------------------------------------------
def status_extras(store_dir: str | Path, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Refusals per reason, DP epsilon per round and enrolment counts of a store."""
    from .enrolment import EnrolmentRegistry
    from .validation import read_rejections

    reg = EnrolmentRegistry(store_dir)
    try:
        tokens = reg.tokens()
    finally:
        reg.close()
    dp = [{"round_id": r["round_id"], "epsilon": r["metrics"]["dp_epsilon"], "delta": r["metrics"].get("dp_delta")}
          for r in rounds if "dp_epsilon" in (r.get("metrics") or {})]
    return {"rejections": read_rejections(store_dir), "dp": dp,
            "enrolment": {"tokens": len(tokens), "bound": sum(bool(t["device_id"]) for t in tokens),
                          "revoked": sum(bool(t["revoked_at"]) for t in tokens)}}


def print_status_extras(con, extras: dict[str, Any]) -> None:
    from rich.table import Table

    rej = extras["rejections"]
    if rej:
        t = Table(title="refused requests")
        t.add_column("reason")
        t.add_column("count")
        for reason, n in sorted(rej.items(), key=lambda kv: -kv[1]):
            t.add_row(reason, str(n))
        con.print(t)
    else:
        con.print("refused requests: none")
    if extras["dp"]:
        last = extras["dp"][-1]
        con.print("DP epsilon per round: " + ", ".join(f"r{d['round_id']} {d['epsilon']:.3f}" for d in extras["dp"])
                  + f" (delta {last['delta']:g})")
    e = extras["enrolment"]
    con.print(f"enrolment tokens: {e['tokens']} issued, {e['bound']} bound, {e['revoked']} revoked")
