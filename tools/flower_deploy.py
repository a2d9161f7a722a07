#!/usr/bin/env python
"""A fleet on Flower's deployment engine, on one machine, with real processes: one `flower-superlink`,
one `flower-supernode` per device (its own profile, data shard and plan as node config; the ClientApp
plans/trains under the memory guard with OOM step-down), TLS between them (certificates from
`edge-coordinator certs`), SuperNode authentication (EC keys registered with `flwr supernode
register`), and the app submitted with `flwr run` from the project root (pyproject.toml's
[tool.flwr.app]). Waits for the run, reads the ServerApp's round journal, prints each round and
writes `summary.json` and `rounds.png` under --out, like tools/fleet.py (same fleet YAML, same
devices' plans and data shards, same round settings).

    python tools/flower_deploy.py --config tools/demo_fleet.yaml --out runs/flower_demo

`Deployment` is also what tests/test_flower_deploy.py drives.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import fleet as F  # noqa: E402  (tools/fleet.py: config, plans, data shards, summary plot)

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment
CONNECTION = "local"


@dataclass
class Deployment:
    """One SuperLink + SuperNodes on 127.0.0.1 under `out`; use as a context manager (stops every process).

    tls: serve over TLS with a development CA (else plaintext); auth: SuperNode authentication (needs tls).
    """

    out: Path
    tls: bool = True
    auth: bool = True
    port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)")
        self.out = Path(self.out).resolve()  # Flower's config wants absolute certificate paths
        self.home = self.out / "flwr-home"  # FLWR_HOME: the SuperLink connection and Flower's app cache
        self.pki = self.out / "pki"
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or F.free_port()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- processes ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(self.home),
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.out / "logs" / f"{name}.log"
        self.logs.append(log)
        p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env(), cwd=ROOT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        """Start the SuperLink (Fleet, Control and Runtime APIs on one port), then write the connection."""
        if self.tls:
            make_pki(self.pki)
            tls = ["--ssl-ca-certfile", str(self.pki / "ca.pem"), "--ssl-certfile", str(self.pki / "server.pem"),
                   "--ssl-keyfile", str(self.pki / "server.key")]
        else:
            tls = ["--insecure"]
        auth = ["--enable-supernode-auth"] if self.auth else []
        proc = self._spawn("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                                         "--disable-runtime-dependency-installation", *tls, *auth])
        self.write_connection()
        wait_for(lambda: self.flwr("ls", check=False).returncode == 0, timeout_s, "the SuperLink's Control API",
                 proc, self.logs[-1])

    def write_connection(self) -> None:
        """$FLWR_HOME/config.toml: the SuperLink connection `flwr run/ls/supernode` use."""
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines += [f"root-certificates = {json.dumps(str(self.pki / 'ca.pem'))}"] if self.tls else ["insecure = true"]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_supernodes(self, nodes: Mapping[str, Mapping[str, Any]], register: bool = True) -> list[subprocess.Popen]:
        """One SuperNode per name (its ClientApp's node config: model, profile, data, ...). With auth, each
        gets a fresh key pair whose public key is registered first (`flwr supernode register`, concurrently);
        register=False leaves the keys unregistered (the SuperLink must refuse those nodes)."""
        keys = {name: node_keys(self.out / "keys", name) for name in nodes} if self.auth else {}
        regs = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", str(pub), CONNECTION, "--name", name],
                                 env=self.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for name, (_, pub) in keys.items()] if register else []
        for name, reg in zip(keys, regs):
            out, _ = reg.communicate(timeout=120)
            if reg.returncode != 0:
                raise RuntimeError(f"flwr supernode register ({name}) failed ({reg.returncode}): {out[-2000:]}")
        started = []
        for name, nc in nodes.items():
            cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port",
                   str(F.free_port()), "--node-config", node_config_arg(nc), "--max-wait-time", "120"]
            cmd += ["--root-certificates", str(self.pki / "ca.pem")] if self.tls else ["--insecure"]
            if name in keys:
                cmd += ["--auth-supernode-private-key", str(keys[name][0])]
            started.append(self._spawn(f"supernode-{name}", cmd))
        return started

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`flwr ARGS --format json` against this SuperLink (CompletedProcess; raises on failure if check)."""
        if args[0] == "ls":
            args = (*args, CONNECTION)
        r = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=self.env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return r

    def run(self, run_config: Mapping[str, Any], app: Path = ROOT) -> int:
        """`flwr run APP local --run-config FILE` (APP: the project root, or `stage_app`'s copy); the run id."""
        path = self.out / "run-config.toml"
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        r = self.flwr("run", str(app), CONNECTION, "--run-config", str(path))
        return int(json.loads(r.stdout[r.stdout.index("{"):])["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status (`flwr ls`), e.g. 'running' or 'finished:completed'."""
        r = self.flwr("ls", "--run-id", str(run_id), check=False)
        if r.returncode != 0 or "{" not in r.stdout:
            return "unknown"
        runs = json.loads(r.stdout[r.stdout.index("{"):]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def wait(self, run_id: int, timeout_s: float, on_poll: Callable[[], None] | None = None,
             near_end: Callable[[], bool] | None = None) -> str:
        """Block until the run is finished (its final status) or `timeout_s` passed ('timeout').

        Each `flwr ls` costs a CLI start (~2 s CPU): it is asked every 15 s, and every second once
        `near_end()` says the run should be about to finish (e.g. the journal has the last round)."""
        t0, last = time.time(), 0.0
        while time.time() - t0 < timeout_s:
            if self.procs and self.procs[0].poll() is not None:
                return f"superlink exited ({self.procs[0].returncode})"
            if on_poll is not None:
                on_poll()
            soon = near_end is not None and near_end()
            if soon or time.time() - last > 15.0:
                last, status = time.time(), self.status(run_id)
                if status.startswith("finished"):
                    return status
            time.sleep(1.0)
        return "timeout"

    def stop(self) -> None:
        """Terminate every process this deployment started and their children (SuperExec, app processes)."""
        import psutil

        tree = []
        for p in self.procs:
            try:
                tree += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in tree:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, lines: int = 25) -> str:
        """The last lines of every log (for failure messages)."""
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs if log.exists())


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not up within {timeout_s:.0f}s; log {log}:\n{log.read_text()[-3000:]}")


def stage_app(out: Path) -> Path:
    """A copy of the Flower app (pyproject.toml + the FAB's packages) under `out/app`. `flwr run` walks
    every file under the app directory before filtering; from the project root that includes .venv
    (~10 s on the 2-core box), from this copy it does not. The FAB built from it is the same."""
    import shutil

    app = out / "app"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    for pkg in ("coordinator", "edge_runtime", "protos"):
        shutil.copytree(ROOT / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return app


def make_pki(out: Path) -> None:
    """A development CA + server certificate for 127.0.0.1/localhost (`edge-coordinator certs`)."""
    if (out / "server.pem").exists():
        return
    subprocess.run([sys.executable, "-m", "coordinator.cli", "certs", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def node_keys(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (what Flower's node authentication takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{name}.key", out / f"{name}.pub"
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def toml_value(v: Any) -> str:
    """A TOML value for a run/node config entry (strings quoted, booleans lower-case)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def node_config_arg(nc: Mapping[str, Any]) -> str:
    """--node-config 'k="v" n=1' (Flower splits on spaces: paths must not contain spaces)."""
    bad = [f"{k}={v!r}" for k, v in nc.items() if " " in str(v)]
    if bad:
        raise ValueError(f"node config values with spaces cannot be passed to flower-supernode: {bad}; "
                         "move those files to a path without spaces")
    return " ".join(f"{k}={toml_value(v)}" for k, v in nc.items())


# -- the fleet YAML on Flower ------------------------------------------------------------------------
def run_config_for(cfg: F.FleetConfig, model: str, eval_path: Path, n: int, journal: Path) -> dict[str, Any]:
    """The run config of a fleet YAML: the settings tools/fleet.py gives `edge-coordinator serve`."""
    rc: dict[str, Any] = {"model": model, "strategy": cfg.strategy, "num-server-rounds": cfg.rounds,
                          "min-clients": n, "max-rank": cfg.max_rank, "lora-alpha": cfg.lora_alpha,
                          "local-steps": cfg.local_steps, "zo-local-steps": cfg.zo_local_steps, "lr": cfg.lr,
                          "zo-lr": cfg.zo_lr, "seed": cfg.seed, "task": cfg.task, "num-labels": cfg.num_labels,
                          "eval-data": str(eval_path), "eval-limit": cfg.eval_examples, "journal": str(journal)}
    for k, v in cfg.policy.items():  # serve's round-policy flags are the run config's keys (no-X: X = false)
        rc[k[3:] if k.startswith("no-") else k] = (not v) if k.startswith("no-") else v
    return rc


def node_configs(cfg: F.FleetConfig, model: str, admitted: list[dict[str, Any]], shards: list[Path],
                 self_plan: bool = False) -> list[dict[str, Any]]:
    """Each device's node config: its profile, data shard and the plan tools/fleet.py made for it (what
    `make demo` gives `join --plan`); self_plan: no plan, the ClientApp plans from its profile."""
    return [{"model": model, "profile": str(ROOT / d["profile_path"]), "data": str(shard), "task": cfg.task,
             "threads": 1, "local-steps": cfg.local_steps, **({} if self_plan else {"plan": str(d["plan_path"])})}
            for d, shard in zip(admitted, shards)]


def summary_rows(journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows like tools/fleet.py's (round 0 = the initial global) from the ServerApp's journal."""
    evals = {r["round"]: r for r in journal if r["kind"] == "evaluation"}
    fits = {r["round"]: r for r in journal if r["kind"] == "fit"}
    rows, t_prev = [], 0.0
    for rid in sorted(set(evals) | set(fits)):
        ev, fit = evals.get(rid, {}), fits.get(rid, {})
        clients = fit.get("clients", {})
        rows.append({"round": rid, "state": "initial" if rid == 0 else ("aggregated" if fit.get("uploads") else "failed"),
                     "accuracy": ev.get("accuracy"), "loss": ev.get("loss"), "accepted": int(fit.get("uploads", 0)),
                     "rejected": int(fit.get("rejected", 0)), "failures": int(fit.get("failures", 0)),
                     "bytes_up": sum(c["bytes_up"] for c in clients.values()),
                     "bytes_down": sum(c["bytes_down"] for c in clients.values()),
                     "devices_dropped": int(fit.get("failures", 0)),
                     "wall_s": fit["t"] - t_prev if "t" in fit else None, "clients": clients})
        t_prev = fit.get("t", t_prev)
    return rows


def deploy_fleet(cfg: F.FleetConfig, out: Path, timeout_s: float, tls: bool = True, auth: bool = True,
                 app: Path = ROOT, self_plan: bool = False) -> dict[str, Any]:
    """Plan + shard like tools/fleet.py, run the fleet on Flower's deployment engine, summarise."""
    from coordinator.flower_run import read_journal

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model = F.resolve_model(cfg.model)
    admitted, refused = F.plan_fleet(cfg, model, out)
    if not admitted:
        raise SystemExit("no device has a feasible plan; see the refusals above")
    shards, eval_path, sizes = F.prepare_data(cfg, len(admitted), out)
    F.print_plans(admitted, refused, sizes)
    journal = out / "journal"
    for old in journal.glob("*"):
        old.unlink()
    shown: set[int] = set()

    def show(final: bool = False) -> None:  # a round once it is evaluated (the evaluation follows the fit)
        for row in summary_rows(read_journal(journal)):
            if row["round"] not in shown and (row["accuracy"] is not None or final):
                shown.add(row["round"])
                F.print_round(row)

    with Deployment(out, tls=tls, auth=auth) as dep:
        dep.start_superlink()
        ncs = node_configs(cfg, model, admitted, shards, self_plan)
        dep.start_supernodes({d["name"]: nc for d, nc in zip(admitted, ncs)})
        F.console.print(f"SuperLink on 127.0.0.1:{dep.port} ({'TLS' if tls else 'plaintext'}"
                        f"{', SuperNode authentication' if auth else ''}); {len(admitted)} SuperNodes; logs under "
                        f"{out / 'logs'}")
        run_id = dep.run(run_config_for(cfg, model, eval_path, len(admitted), journal), app)
        status = dep.wait(run_id, timeout_s - (time.time() - t_start), show,
                          near_end=lambda: any(r["kind"] == "fit" and r["round"] >= cfg.rounds
                                               for r in read_journal(journal)))
        show(final=True)
    rows = summary_rows(read_journal(journal))
    result = {"engine": "flower-deployment", "config": dict(cfg.__dict__), "model_path": model, "run_id": run_id,
              "status": status, "tls": tls, "supernode_auth": auth,
              "devices": [{"name": d["name"], "profile": d["profile"].name, "plan": d["plan"].to_dict(), "examples": n}
                          for d, n in zip(admitted, sizes)],
              "refused": refused, "rounds": rows, "wall_s": time.time() - t_start}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    F.plot(rows, out / "rounds.png", f"{cfg.strategy} on Flower (SuperLink + {len(admitted)} SuperNodes), {cfg.model}")
    F.console.print(f"run {run_id}: {status}; wrote {out / 'summary.json'} and {out / 'rounds.png'} "
                    f"in {result['wall_s']:.0f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "tools" / "demo_fleet.yaml"), help="a tools/fleet.py fleet YAML")
    ap.add_argument("--out", default="runs/flower_deploy")
    ap.add_argument("--strategy", default=None, help="override the config's strategy")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop everything after this many seconds")
    ap.add_argument("--insecure", action="store_true", help="plaintext between SuperLink and SuperNodes (no TLS, no auth)")
    ap.add_argument("--no-auth", action="store_true", help="TLS but no SuperNode authentication")
    ap.add_argument("--stage-app", action="store_true",
                    help="submit a copy of the app (pyproject + packages) instead of the project root (faster FAB build)")
    ap.add_argument("--self-plan", action="store_true",
                    help="each SuperNode plans from its profile instead of receiving tools/fleet.py's plan")
    args = ap.parse_args(argv)
    cfg = F.FleetConfig.load(args.config)
    cfg.strategy = args.strategy or cfg.strategy
    cfg.rounds = args.rounds or cfg.rounds
    out = Path(args.out).resolve()
    result = deploy_fleet(cfg, out, args.timeout, tls=not args.insecure, auth=not (args.insecure or args.no_auth),
                          app=stage_app(out) if args.stage_app else ROOT, self_plan=args.self_plan)
    ok = result["status"] == "finished:completed" and any(r["state"] == "aggregated" for r in result["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
