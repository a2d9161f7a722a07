"""The operator's view: a small status page, its JSON API and the Prometheus endpoint over HTTP.

Routes (stdlib `http.server`, one daemon thread per server):
  /             status page (HTML + inline JS/SVG; no external assets, works offline)
  /api/status   `status_snapshot(coordinator)` as JSON (the page reads only this)
  /metrics      Prometheus text exposition of the coordinator's registry
  /healthz      "ok"
`start_ops_servers(coordinator, host, metrics_port, dashboard_port)` starts one server when
both ports are equal, two otherwise; port 0 turns that endpoint off.
"""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import rounds as R
from .metrics import CONTENT_TYPE, last_eval

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("coordinator.dashboard")
PROFILE_KEYS = ("kind", "accelerator", "accelerator_name", "memory_total_bytes", "memory_budget_bytes",
                "unified_memory", "uplink_mbps", "compute_gflops")
PLAN_KEYS = ("mode", "rank", "base_precision", "batch_size", "seq_len", "gradient_checkpointing",
             "upload_precision", "target_modules")


def _device_docs(coordinator: "Coordinator") -> dict[str, tuple[dict, dict]]:
    """device id -> (profile, plan) as registered (JSON columns of the store's devices table)."""
    rows = coordinator.store._exec("SELECT device_id, profile_json, plan_json FROM devices")  # noqa: SLF001
    out = {}
    for dev_id, prof, plan in rows:
        try:
            out[dev_id] = (json.loads(prof or "{}"), json.loads(plan or "{}"))
        except ValueError:
            out[dev_id] = ({}, {})
    return out


def _pick(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def _per(updates: list[dict[str, Any]], key: str) -> dict[Any, list[int]]:
    """key value -> [accepted updates, upload bytes]."""
    out: dict[Any, list[int]] = {}
    for u in updates:
        row = out.setdefault(u[key], [0, 0])
        row[0] += 1
        row[1] += int(u["wire_bytes"])
    return out


def _device_rows(c: "Coordinator", devices: dict, active: set[str], updates: list[dict[str, Any]],
                 now: float) -> list[dict[str, Any]]:
    docs = _device_docs(c)
    per_dev = _per(updates, "device_id")
    rows = []
    for d in sorted(devices.values(), key=lambda d: d.name):
        prof, plan = docs.get(d.device_id, ({}, {}))
        n, b = per_dev.get(d.device_id, [0, 0])
        rows.append({
            "device_id": d.device_id, "name": d.name, "mode": c.method.device_mode(d.mode), "plan_rank": d.plan_rank,
            "assigned_rank": d.assigned_rank, "active": d.device_id in active,
            "last_seen_s": round(max(0.0, now - d.last_seen), 1), "profile": _pick(prof, PROFILE_KEYS),
            "plan": {**_pick(plan, PLAN_KEYS), "memory_total_bytes": (plan.get("memory") or {}).get("total_bytes")},
            "accepted_updates": n, "upload_bytes": b})
    return rows


def _round_rows(rounds: list[dict[str, Any]], updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    per_round = _per(updates, "round_id")
    rows = []
    for r in rounds:
        m = r.get("metrics") or {}
        n, b = per_round.get(r["round_id"], [0, 0])
        rows.append({
            "round_id": r["round_id"], "state": r["state"], "selected": len(r["selected"]), "accepted": n,
            "dropped": len(r["dropped"]), "late": r["late"],
            "duration_s": round(r["closed_at"] - r["opened_at"], 3) if r["closed_at"] else None,
            "loss": m.get("loss"), "accuracy": m.get("accuracy"), "aggregate_s": m.get("aggregate_s"),
            "upload_bytes": b})
    return rows


def status_snapshot(coordinator: "Coordinator") -> dict[str, Any]:
    """Everything the status page shows, JSON-ready. Reads the store; takes no coordinator lock."""
    c = coordinator
    now = c.clock()
    rounds = c.store.rounds()
    updates = c.store.updates()
    initial = c.store.get_meta("initial_metrics", {}) or {}
    live = c.metrics.snapshot()
    devices = dict(c.fed.devices)
    active = set(R.available(devices, c.fed.cfg, now))
    dev_rows = _device_rows(c, devices, active, updates, now)
    round_rows = _round_rows(rounds, updates)
    eval_round, eval_m = last_eval(rounds, initial)
    cur = c.fed.current
    return {
        "generated_at": now,
        "config": {k: getattr(c.cfg, k) for k in ("model", "strategy", "rounds", "max_rank", "task", "min_devices",
                                                  "fraction", "quorum", "round_timeout_s", "local_steps")},
        "federation": {"current_round": c.fed.last_round_id, "completed": c.fed.completed, "done": c.fed.done,
                       "round_state": cur.state if cur else None,
                       "pending": list(cur.pending) if cur is not None and cur.state == R.OPEN else []},
        "initial": {k: initial[k] for k in ("loss", "accuracy") if k in initial},
        "last_eval": {"round_id": eval_round, **{k: eval_m[k] for k in ("loss", "accuracy") if k in eval_m}},
        "devices": dev_rows,
        "rounds": round_rows,
        "totals": {"devices": len(devices), "active_devices": len(active), "accepted_updates": len(updates),
                   "upload_bytes": sum(int(u["wire_bytes"]) for u in updates),
                   "download_bytes": live["download_bytes"], "rejected": live["rejected"],
                   "rejected_total": sum(live["rejected"].values()),
                   # durable (store events, whole history): late uploads and invalid uploads
                   "late_uploads": len(c.store.events("late_upload")),
                   "invalid_uploads": len(c.store.events("upload_rejected"))},
        "rejections": live["recent_rejections"],  # since this process started, newest last
    }


def _handler(coordinator: "Coordinator", metrics: bool, dashboard: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefed-ops/1"

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics" and metrics:
                    self._send(200, coordinator.metrics.render(), CONTENT_TYPE)
                elif path in ("/", "/index.html") and dashboard:
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/api/status" and dashboard:
                    body = json.dumps(status_snapshot(coordinator), default=str).encode()
                    self._send(200, body, "application/json")
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._send(404, f"no route {path}; try {_routes(metrics, dashboard)}\n".encode(), "text/plain")
            except Exception as e:  # noqa: BLE001 - report, keep serving
                log.exception("ops endpoint %s failed", path)
                self._send(500, f"error: {e}\n".encode(), "text/plain")

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("ops http: " + fmt, *args)

    return Handler


def _routes(metrics: bool, dashboard: bool) -> str:
    return ", ".join((["/metrics"] if metrics else []) + (["/", "/api/status"] if dashboard else []) + ["/healthz"])


def start_ops_server(coordinator: "Coordinator", host: str = "127.0.0.1", port: int = 0, *, metrics: bool = True,
                     dashboard: bool = True) -> tuple[ThreadingHTTPServer, int]:
    """Serve the ops routes on host:port (0 picks a free port) from a daemon thread.

    Returns (server, bound port); stop it with `server.shutdown(); server.server_close()`.
    """
    server = ThreadingHTTPServer((host, port), _handler(coordinator, metrics, dashboard))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"ops-http-{server.server_port}", daemon=True).start()
    log.info("ops endpoints on http://%s:%d (%s)", host, server.server_port, _routes(metrics, dashboard))
    return server, server.server_port


def start_ops_servers(coordinator: "Coordinator", host: str, metrics_port: int,
                      dashboard_port: int) -> list[ThreadingHTTPServer]:
    """What `serve --metrics-port M --dashboard-port D` starts: nothing for 0, one server if M == D."""
    for name, v in (("--metrics-port", metrics_port), ("--dashboard-port", dashboard_port)):
        if not 0 <= v <= 65535:
            raise ValueError(f"{name} {v} is not a TCP port: use 1-65535, or 0 to turn it off")
    if metrics_port and metrics_port == dashboard_port:
        return [start_ops_server(coordinator, host, metrics_port)[0]]
    out = []
    if metrics_port:
        out.append(start_ops_server(coordinator, host, metrics_port, metrics=True, dashboard=False)[0])
    if dashboard_port:
        out.append(start_ops_server(coordinator, host, dashboard_port, metrics=True, dashboard=True)[0])
    return out


def stop_ops_servers(servers: list[ThreadingHTTPServer]) -> None:
    for s in servers:
        s.shutdown()
        s.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgefed coordinator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:12px 20px} header h1{margin:0;font-size:18px}
 header span{opacity:.75;margin-left:12px}
 main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
 section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 14px}
 section.wide{grid-column:1/-1} h2{font-size:15px;margin:0 0 8px}
 table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2}
 th{font-weight:600;color:#4a5263;font-size:12px;text-transform:uppercase}
 .kpis{display:flex;gap:12px;flex-wrap:wrap} .kpi{background:#eef2fb;border-radius:6px;padding:8px 12px;min-width:110px}
 .kpi b{display:block;font-size:20px} .on{color:#157f3b} .off{color:#a33} .muted{color:#7a8294}
 svg{width:100%;height:220px} .axis{stroke:#aab;stroke-width:1} .lbl{font-size:11px;fill:#556}
</style></head>
<body>
<header><h1>edgefed coordinator <span id="subtitle">loading…</span></h1></header>
<main>
 <section class="wide"><div class="kpis" id="kpis"></div></section>
 <section><h2>Held-out accuracy</h2><svg id="acc" viewBox="0 0 460 220" role="img"></svg></section>
 <section><h2>Held-out loss</h2><svg id="loss" viewBox="0 0 460 220" role="img"></svg></section>
 <section class="wide"><h2>Devices</h2><table id="devices"></table></section>
 <section class="wide"><h2>Rounds</h2><table id="rounds"></table></section>
 <section><h2>Rejected updates by reason</h2><table id="rejected"></table></section>
 <section><h2>Recent rejections</h2><table id="rejections"></table></section>
</main>
<script>
"use strict";
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmtB = b => { b = Number(b || 0); const u = ["B","KiB","MiB","GiB","TiB"]; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; } return (i ? b.toFixed(1) : b) + " " + u[i]; };
const num = (x, d) => x === null || x === undefined ? "–" : Number(x).toFixed(d);
function table(id, cols, rows, empty) {
  const head = "<tr>" + cols.map(c => "<th>" + esc(c[0]) + "</th>").join("") + "</tr>";
  const body = rows.length ? rows.map(r => "<tr>" + cols.map(c => "<td>" + c[1](r) + "</td>").join("") + "</tr>").join("")
    : "<tr><td class='muted' colspan='" + cols.length + "'>" + esc(empty) + "</td></tr>";
  document.getElementById(id).innerHTML = head + body;
}
function chart(id, pts, color) {
  const W = 460, H = 220, L = 46, R = 12, T = 12, B = 30, el = document.getElementById(id);
  if (!pts.length) { el.innerHTML = "<text class='lbl' x='" + W/2 + "' y='" + H/2 + "' text-anchor='middle'>no evaluated rounds yet</text>"; return; }
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; } const pad = (y1 - y0) * 0.1; y0 -= pad; y1 += pad;
  const x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(x0 + 1, ...pts.map(p => p[0]));
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  let s = "<line class='axis' x1='" + L + "' y1='" + (H-B) + "' x2='" + (W-R) + "' y2='" + (H-B) + "'/>" +
          "<line class='axis' x1='" + L + "' y1='" + T + "' x2='" + L + "' y2='" + (H-B) + "'/>";
  for (let i = 0; i <= 4; i++) { const v = y0 + (y1 - y0) * i / 4;
    s += "<text class='lbl' x='" + (L-4) + "' y='" + (Y(v)+4) + "' text-anchor='end'>" + v.toFixed(3) + "</text>"; }
  for (const p of pts) s += "<text class='lbl' x='" + X(p[0]) + "' y='" + (H-B+16) + "' text-anchor='middle'>" + p[0] + "</text>";
  s += "<polyline fill='none' stroke='" + color + "' stroke-width='2.5' points='" + pts.map(p => X(p[0]) + "," + Y(p[1])).join(" ") + "'/>";
  for (const p of pts) s += "<circle cx='" + X(p[0]) + "' cy='" + Y(p[1]) + "' r='3.5' fill='" + color + "'><title>round " + p[0] + ": " + p[1].toFixed(4) + "</title></circle>";
  el.innerHTML = s;
}
function render(st) {
  const f = st.federation, t = st.totals, cfg = st.config;
  document.getElementById("subtitle").textContent = cfg.strategy + " · round " + f.current_round + " (" +
    (f.done ? "done" : (f.round_state || "waiting")) + ") · " + f.completed + "/" + cfg.rounds + " aggregated";
  const k = [["devices", t.devices], ["active", t.active_devices], ["accepted updates", t.accepted_updates],
    ["rejected", t.rejected_total], ["bytes up", fmtB(t.upload_bytes)], ["bytes down", fmtB(t.download_bytes)],
    ["last accuracy", num(st.last_eval.accuracy, 3)], ["last loss", num(st.last_eval.loss, 4)]];
  document.getElementById("kpis").innerHTML = k.map(x => "<div class='kpi'>" + esc(x[0]) + "<b>" + esc(x[1]) + "</b></div>").join("");
  const ev = (st.initial.loss !== undefined ? [{round_id: 0, loss: st.initial.loss, accuracy: st.initial.accuracy}] : [])
    .concat(st.rounds.filter(r => r.state === "aggregated"));
  chart("acc", ev.filter(r => r.accuracy != null).map(r => [r.round_id, r.accuracy]), "#2a6fdb");
  chart("loss", ev.filter(r => r.loss != null).map(r => [r.round_id, r.loss]), "#d9480f");
  table("devices", [["name", d => "<b>" + esc(d.name) + "</b><div class='muted'>" + esc(d.device_id) + "</div>"],
    ["status", d => d.active ? "<span class='on'>active</span>" : "<span class='off'>silent " + esc(d.last_seen_s) + "s</span>"],
    ["device", d => esc(d.profile.accelerator || "?") + " " + esc(d.profile.accelerator_name || "") +
       "<div class='muted'>" + fmtB(d.profile.memory_budget_bytes) + " budget / " + fmtB(d.profile.memory_total_bytes) + "</div>"],
    ["mode", d => esc(d.mode)], ["rank plan→assigned", d => esc(d.plan_rank) + " → " + esc(d.assigned_rank)],
    ["precision", d => esc(d.plan.base_precision || "?") + " / up " + esc(d.plan.upload_precision || "?")],
    ["batch × seq", d => esc(d.plan.batch_size ?? "?") + " × " + esc(d.plan.seq_len ?? "?")],
    ["updates", d => esc(d.accepted_updates)], ["bytes up", d => fmtB(d.upload_bytes)]], st.devices, "no devices registered yet");
  table("rounds", [["round", r => esc(r.round_id)], ["state", r => esc(r.state)], ["selected", r => esc(r.selected)],
    ["accepted", r => esc(r.accepted)], ["dropped", r => esc(r.dropped)], ["late", r => esc(r.late)],
    ["duration s", r => num(r.duration_s, 1)], ["aggregate s", r => num(r.aggregate_s, 2)],
    ["loss", r => num(r.loss, 4)], ["accuracy", r => num(r.accuracy, 3)], ["bytes up", r => fmtB(r.upload_bytes)]],
    st.rounds.slice().reverse(), "no rounds yet");
  table("rejected", [["reason", r => esc(r[0])], ["count", r => esc(r[1])]], Object.entries(t.rejected), "none");
  table("rejections", [["time", e => esc(new Date(e.ts * 1000).toLocaleTimeString())], ["reason", e => esc(e.reason)],
    ["detail", e => "<span class='muted'>" + esc(e.detail) + "</span>"]], st.rejections.slice().reverse(), "none");
}
async function refresh() {
  try { const r = await fetch("api/status", {cache: "no-store"}); render(await r.json()); document.body.dataset.ready = "1"; }
  catch (e) { document.getElementById("subtitle").textContent = "status unavailable: " + e; }
}
refresh(); setInterval(refresh, 3000);
</script>
</body></html>
"""
